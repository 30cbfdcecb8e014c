#!/bin/sh
# Make the Debian bookworm base image that the rnnserve images build FROM, where no registry
# can be reached: mmdebstrap (minbase, Debian's own mirror) piped into `docker import`.
#
#   deploy/docker/debian-base.sh [TAG]          (default debian:bookworm-slim; needs root)
#
# Like Docker Hub's slim image it leaves out man pages, docs and locales. ~40 s here.
# MIRROR overrides the Debian mirror (default http://deb.debian.org).
set -eu
tag=${1:-debian:bookworm-slim}
mirror=${MIRROR:-http://deb.debian.org}
mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm - \
    "deb $mirror/debian bookworm main" \
    "deb $mirror/debian bookworm-updates main" \
    "deb $mirror/debian-security bookworm-security main" \
  | docker import --change 'CMD ["bash"]' --message "mmdebstrap bookworm minbase" - "$tag"

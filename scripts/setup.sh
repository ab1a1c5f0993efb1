#!/usr/bin/env bash
# Installs the Debian packages hive builds and runs with, and any packages named as arguments
# (`setup.sh gnuplot-nox` for the scripts that plot). Idempotent: prints nothing and touches
# nothing when they are all present, so every other script can call it first.
set -euo pipefail

packages=(
  libtorch-dev          # tensors, autograd, modules, optimizers (1.13, CPU)
  libgloo-dev           # headers of libtorch's Gloo backend (averaging::Gloo; the library comes with libtorch)
  libopenblas0-pthread  # without it libtorch's matrix kernels run ~20x slower
  libasio-dev           # networking, timers, coroutines (standalone)
  libsodium-dev         # peer identities and signed records (Ed25519), the connection handshake
  libssl-dev            # AES-256-GCM of encrypted connections (libcrypto; libasio-dev depends on it anyway)
  libopendht-dev        # OpenDHT, the second DHT routing model (dht::OpenDHT)
  pkg-config            # how CMake finds OpenDHT
  nlohmann-json3-dev    # config files and MessagePack wire headers
  libfmt-dev
  doctest-dev
  dataset-fashion-mnist # real data for the examples
  cmake
  g++
  ccache
  iproute2              # the multi-host tests build their hosts from network namespaces (ip netns)
  nftables              # and their NAT routers (a masquerade rule in a router namespace)
)

packages+=("$@")

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "setup.sh: missing Debian packages: ${missing[*]}" >&2
    echo "setup.sh: installing them needs root, and sudo is not available; run as root:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

echo "setup.sh: installing ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"

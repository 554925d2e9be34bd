"""Build the server's container image with podman: `make image`, `python deploy/image.py` or
`python -m deploy.image` (from the repository root), as root.

Three steps, each skipped when its result is already there, so a second run only rebuilds what
changed (podman keeps the layers between runs on one machine):

1. the base image `localhost/grym-base:bookworm`: a minimal Debian bookworm made by debootstrap
   from the Debian mirror this machine's apt uses, imported into podman (no image registry is
   needed; skipped with `--base debian:bookworm-slim` where a registry is reachable);
2. the wheelhouse in .cache/image/context: wheels/ (every dependency, at the versions of the
   environment running this script, torch the local CPU wheel) and project/ (the project's own
   wheel), made with this environment's pip (the image's Python is Debian bookworm's 3.11);
3. `podman build` of deploy/Containerfile on that context, tagged
   localhost/grym-stream:<version> and :latest.

Every podman command runs with CONTAINERS_CONF=deploy/containers.conf and the runc runtime
(the settings podman needs on these machines; /etc is left alone). Standard library only: this
file is no part of the server's packages.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "Containerfile"
CONTAINERS_CONF = DEPLOY / "containers.conf"
CACHE = ROOT / ".cache" / "image"
CONTEXT = CACHE / "context"
BASE_IMAGE = "localhost/grym-base:bookworm"
IMAGE = "localhost/grym-stream"
LABEL = "org.opencontainers.image.title=grym-stream"  # the Containerfile's
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What the project's wheel is made of (pyproject's packages and data): a change here rebuilds it.
SOURCES = ("grym", "stream", "models", "clients", "benchmarks", "pyproject.toml", "README.md")
# The image's extras: onnxruntime's CPU build. Never `gpu` here: the image is CPU-only.
EXTRAS = "cpu"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def podman_env() -> dict[str, str]:
    """The environment of every podman command: the project's containers.conf."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=podman_env(), check=check, text=True, capture_output=capture
    )


def say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(label: str) -> Iterator[None]:
    start = time.monotonic()
    say(f"{label}...")
    yield
    say(f"{label}: done in {time.monotonic() - start:.1f} s")


# --- 1. the base image ---------------------------------------------------------------------------


def apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of this machine's Debian sources, one-line and deb822 formats both."""
    found: list[tuple[str, list[str]]] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (key.strip().lower(), value.strip())
                    for key, _, value in (
                        line.partition(":") for line in stanza.splitlines()
                        if line.strip() and not line.lstrip().startswith("#")
                    )
                )  # fmt: skip
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split()))
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    found.append((parts[1], [parts[2]]))
    return found


def mirrors() -> tuple[str, str | None]:
    """The Debian mirror apt uses here for bookworm, and its security mirror (or None)."""
    sources = apt_sources()
    main = next((uri for uri, suites in sources if SUITE in suites), DEFAULT_MIRROR)
    security = next((uri for uri, suites in sources if f"{SUITE}-security" in suites), None)
    return main.rstrip("/"), security.rstrip("/") if security else None


def make_base(mirror: str | None) -> None:
    """debootstrap a minimal bookworm and import it as BASE_IMAGE (about 25 s, 121 MB)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        say(f"base image {BASE_IMAGE}: present, kept")
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed: run `make system-deps` (Debian package)")
    main, security = mirrors()
    main = mirror or main
    with step(f"base image {BASE_IMAGE}: debootstrap --variant=minbase {SUITE} from {main}"):
        with tempfile.TemporaryDirectory(prefix="grym-base-", dir=CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, str(rootfs), main],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            lines = [f"deb {main} {SUITE} main", f"deb {main} {SUITE}-updates main"]
            if security:
                lines.append(f"deb {security} {SUITE}-security main")
            (rootfs / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / junk).glob("*"):
                    if path.is_file():
                        path.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(
                ["podman", "import", "--quiet", "--change", f"ENV PATH={PATH}",
                 "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE],
                stdin=tar.stdout, env=podman_env(), check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise SystemExit("tar of the debootstrapped root failed")


# --- 2. the wheelhouse ---------------------------------------------------------------------------


def digest(paths: Sequence[Path], root: Path) -> str:
    """sha256 over the names and contents of the files under `paths`."""
    h = hashlib.sha256()
    for top in paths:
        files = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in files:
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def pip(*args: str) -> None:
    # -qq: errors only (this machine's pip config names index folders that may be missing).
    subprocess.run(
        [sys.executable, "-m", "pip", *args, "-qq", "--disable-pip-version-check"], check=True
    )


def project_wheel(source: Path = ROOT) -> Path:
    """The project's wheel in context/project, made from `source` (a checkout) and rebuilt
    when its sources changed."""
    folder = CONTEXT / "project"
    stamp = folder / "SOURCES.sha256"
    key = digest([source / name for name in SOURCES], source)
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) == 1 and stamp.is_file() and stamp.read_text().strip() == key:
        say(f"project wheel {wheels[0].name}: sources unchanged, kept")
        return wheels[0]
    with step("project wheel"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="grym-wheel-", dir=CACHE) as tmp:
            # Built from a copy: a build inside the checkout leaves build/ and egg-info there.
            src = Path(tmp) / "src"
            for name in SOURCES:
                path = source / name
                if path.is_dir():
                    shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    src.mkdir(exist_ok=True)
                    shutil.copy2(path, src / name)
            pip("wheel", "--no-deps", "--wheel-dir", str(folder), str(src))
        (wheel,) = folder.glob("*.whl")
        stamp.write_text(key + "\n")
    return wheel


def constraints() -> str:
    """This environment's installed versions (the ones the tests ran), the project's left out."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable",
         "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    keep = [
        line for line in frozen.splitlines()
        if "==" in line and not line.startswith(("-e", "grym-stream==", "grym_stream=="))
    ]  # fmt: skip
    return "\n".join(sorted(keep, key=str.lower)) + "\n"


def wheelhouse(project: Path) -> None:
    """Every dependency of the project's wheel (with EXTRAS) in context/wheels, as wheels."""
    folder = CONTEXT / "wheels"
    stamp = folder / "INPUTS.sha256"
    pins = constraints()
    requires = [
        line for line in _metadata(project).splitlines() if line.startswith("Requires-Dist:")
    ]
    key = hashlib.sha256(
        "\n".join([sys.version.split()[0], EXTRAS, pins, *requires]).encode()
    ).hexdigest()
    complete = (folder / "requirements.txt").is_file() and stamp.is_file()
    if complete and stamp.read_text().strip() == key:
        say(f"wheelhouse {folder.relative_to(ROOT)}: complete, kept")
        return
    with step(f"wheelhouse {folder.relative_to(ROOT)} (torch: the local CPU wheel)"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        pinned = CACHE / "constraints.txt"
        pinned.write_text(pins)
        # torch pinned first and explicitly: a range would let pip take a CUDA build of GBs.
        pip(
            "wheel", "--wheel-dir", str(folder), "--constraint", str(pinned),
            "torch==2.13.0", f"{project}[{EXTRAS}]",
        )  # fmt: skip
        for wheel in folder.glob("grym_stream-*.whl"):
            wheel.unlink()
        names = sorted(p.name for p in folder.glob("*.whl"))
        cuda = [n for n in names if n.startswith(("nvidia_", "triton-")) or "+cu" in n]
        torch = [n for n in names if n.startswith("torch-")]
        if cuda or not torch or "+cpu" not in torch[0]:
            raise SystemExit(
                f"the wheelhouse took a CUDA build of torch ({torch}, {cuda}): the local CPU "
                "wheel torch==2.13.0+cpu must be findable by pip (pip config: find-links)"
            )
        requirements = []
        for name in names:
            dist, ver = name.split("-")[:2]
            requirements.append(f"{dist.replace('_', '-')}=={ver}")
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
        size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 1e6
        say(f"wheelhouse: {len(names)} wheels, {size:.0f} MB")
        stamp.write_text(key + "\n")


def _metadata(wheel: Path) -> str:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode()


# --- 3. the image --------------------------------------------------------------------------------


def build_image(base: str, version: str, no_cache: bool = False) -> str:
    tag = f"{IMAGE}:{version}"
    with step(f"podman build {tag} (base {base})"):
        podman(
            "build", "--runtime", "runc", "--network", "host", "--layers",
            # Docker's format: OCI's image config has no HEALTHCHECK, podman would drop it.
            "--format", "docker",
            "--file", str(CONTAINERFILE), "--build-arg", f"BASE={base}",
            "--tag", tag, "--tag", f"{IMAGE}:latest",
            *(["--no-cache"] if no_cache else []),
            str(CONTEXT),
        )  # fmt: skip
    # The layers of earlier builds that no tag uses any more (ours only: by the label).
    podman("image", "prune", "--force", "--filter", f"label={LABEL}", capture=True)
    size = podman("image", "inspect", tag, "--format", "{{.Size}}", capture=True).stdout.strip()
    say(f"image {tag}: {int(size) / 1e6:.0f} MB")
    return tag


def build(
    base: str = BASE_IMAGE, mirror: str | None = None, no_cache: bool = False, source: Path = ROOT
) -> str:
    """All three steps; the image's tag."""
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed: run `make system-deps` (Debian: podman runc)")
    start = time.monotonic()
    CONTEXT.mkdir(parents=True, exist_ok=True)
    if base == BASE_IMAGE:
        make_base(mirror)
    project = project_wheel(source)
    wheelhouse(project)
    tag = build_image(base, project.name.split("-")[1], no_cache)
    say(f"built {tag} in {time.monotonic() - start:.1f} s")
    return tag


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default=BASE_IMAGE,
        help=f"base image (default: {BASE_IMAGE}, made here by debootstrap; with a registry: "
        "debian:bookworm-slim)",
    )  # fmt: skip
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: apt's)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    parser.add_argument(
        "--source", type=Path, default=ROOT,
        help="make the project's wheel from this tree (default: this checkout; e.g. an "
        "unpacked `git archive v0.1.0`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    build(args.base, args.mirror, args.no_cache, args.source.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

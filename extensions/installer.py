"""Install, update and remove user extensions with real git, from a URL or a local path/zip.

Only files move here: no code of the extension runs (no install.py, no pip). Declared
requirements are installed separately, after the user confirms (`install_requirements`).
Every action stays inside the user's extensions folder.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from extensions.manifest import Manifest, read_manifest

GIT_TIMEOUT_S = 300
_REF = re.compile(r"^[A-Za-z0-9._/\-]{1,200}$")
INSTALL_SCRIPTS = ("install.py", "setup.py", "install.sh", "install.bat", "preload.py")


@dataclass(frozen=True)
class GitInfo:
    remote: str | None
    commit: str | None
    branch: str | None  # None: detached (installed at a commit)


@dataclass(frozen=True)
class InstallResult:
    name: str
    path: Path
    manifest: Manifest
    commit: str | None
    skipped_scripts: tuple[str, ...]  # install scripts present that Easel did not run
    requirements: tuple[str, ...]


@dataclass(frozen=True)
class UpdateStatus:
    name: str
    current: str | None
    latest: str | None
    message: str

    @property
    def behind(self) -> bool:
        return bool(self.current and self.latest and self.current != self.latest)


class GitError(ValueError):
    pass


def run_git(args: Sequence[str], cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # never wait for a password on the console
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise GitError("git is not installed: install git to manage extensions") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {args[0]} took longer than {GIT_TIMEOUT_S} s; check the URL") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise GitError(f"git {args[0]} failed: {message[-1] if message else done.returncode}")
    return done.stdout.strip()


def git_info(folder: Path) -> GitInfo:
    if not (folder / ".git").exists():
        return GitInfo(None, None, None)
    try:
        commit = run_git(["rev-parse", "HEAD"], folder)
    except GitError:
        return GitInfo(None, None, None)
    try:
        remote = run_git(["config", "--get", "remote.origin.url"], folder) or None
    except GitError:
        remote = None
    try:
        branch = run_git(["symbolic-ref", "--short", "-q", "HEAD"], folder) or None
    except GitError:
        branch = None
    return GitInfo(remote, commit, branch)


class Installer:
    def __init__(self, user_dir: Path, builtin_names: Sequence[str] = ()) -> None:
        self.user_dir = Path(user_dir)
        self.builtin_names = set(builtin_names)

    # --- install ------------------------------------------------------------------------------

    def install(self, source: str, branch: str | None = None, commit: str | None = None) -> InstallResult:
        """`source`: a git URL (https, ssh, file://), a local git repository, a folder or a .zip."""
        source = (source or "").strip()
        if not source:
            raise ValueError("give a git URL, a local folder or a .zip file to install from")
        for label, ref in (("branch", branch), ("commit", commit)):
            if ref and (not _REF.match(ref) or ref.startswith("-")):
                raise ValueError(f"{label} {ref!r} is not a valid git reference")
        self.user_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=self.user_dir))
        try:
            target = staging / "ext"
            local = Path(source).expanduser()
            is_zip = local.suffix.lower() == ".zip" and local.is_file()
            is_folder = local.is_dir() and not (local / ".git").exists()
            if (is_zip or is_folder) and (branch or commit):
                what = "a .zip file" if is_zip else "a folder that is not a git repository"
                raise ValueError(f"{source} is {what}: a branch or commit applies to git sources only; "
                                 f"leave them empty (or install from a git URL)")
            if is_zip:
                _extract_zip(local, target)
            elif is_folder:
                shutil.copytree(local, target, ignore=shutil.ignore_patterns(".git"))
            else:
                self._clone(source, target, branch, commit)
            manifest = read_manifest(target)
            if manifest.name in self.builtin_names:
                raise ValueError(f"'{manifest.name}' is the name of a built-in extension; rename it")
            final = self.user_dir / manifest.name
            if final.exists():
                raise ValueError(f"extension '{manifest.name}' is already installed: update or uninstall it")
            os.replace(target, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        scripts = tuple(s for s in INSTALL_SCRIPTS if (final / s).exists())
        return InstallResult(manifest.name, final, manifest, git_info(final).commit, scripts,
                             manifest.requirements)

    def _clone(self, source: str, target: Path, branch: str | None, commit: str | None) -> None:
        if source.startswith("-"):
            raise ValueError("the source must be a URL or a path")
        # The ext:: transport runs shell commands; git forbids it by default, and so do we.
        args = ["-c", "protocol.ext.allow=never", "clone", "--quiet"]
        if branch:
            args += ["--branch", branch]
        run_git([*args, "--", source, str(target)])
        if commit:
            run_git(["-c", "advice.detachedHead=false", "checkout", "--quiet", commit, "--"], target)

    # --- update --------------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        path = self.user_dir / name
        if name in self.builtin_names and not path.exists():
            raise ValueError(f"'{name}' is built in: it updates with Easel")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name or "") or not path.is_dir():
            raise ValueError(f"no installed extension named '{name}'")
        return path

    def check_update(self, name: str) -> UpdateStatus:
        path = self.path_of(name)
        info = git_info(path)
        if info.commit is None:
            return UpdateStatus(name, None, None, "not a git checkout: reinstall to update")
        run_git(["fetch", "--quiet", "origin"], path)
        if info.branch is None:
            return UpdateStatus(name, info.commit, info.commit,
                                "pinned to a commit: reinstall with another commit to change it")
        latest = run_git(["rev-parse", f"origin/{info.branch}"], path)
        message = "up to date" if latest == info.commit else f"update available: {latest[:8]}"
        return UpdateStatus(name, info.commit, latest, message)

    def update(self, name: str) -> UpdateStatus:
        status = self.check_update(name)
        if not status.behind:
            return status
        path = self.path_of(name)
        run_git(["merge", "--ff-only", "--quiet", f"origin/{git_info(path).branch}"], path)
        read_manifest(path)  # still an extension? (the error names the problem)
        now = git_info(path).commit
        return UpdateStatus(name, now, status.latest, f"updated to {now[:8]}; restart to use it")

    # --- uninstall -----------------------------------------------------------------------------

    def uninstall(self, name: str) -> None:
        path = self.path_of(name)
        if path.resolve().parent != self.user_dir.resolve():
            raise ValueError(f"'{name}' is not inside {self.user_dir}")
        shutil.rmtree(path)


def _extract_zip(archive: Path, target: Path) -> None:
    """Extract safely (no absolute paths, no '..'); a single top folder is unwrapped."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise ValueError(f"{archive.name}: unsafe path {info.filename!r} in the zip")
        target.mkdir(parents=True)
        zf.extractall(target)
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (target / "extension.toml").exists():
        inner = entries[0]
        for child in inner.iterdir():
            shutil.move(str(child), target / child.name)
        inner.rmdir()


# --- requirements ------------------------------------------------------------------------------

def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements not satisfied by what is installed in this environment."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ValueError(f"requirement {text!r} is not valid: {exc}") from exc
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def pip_command(requirements: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *requirements]


def install_requirements(requirements: Sequence[str], confirmed: bool, run=subprocess.run) -> str:
    """pip install into the app's environment, only once the user has confirmed."""
    if not requirements:
        return "nothing to install"
    if not confirmed:
        raise ValueError("tick 'I trust these packages' to install them: pip runs their setup code")
    from packaging.requirements import InvalidRequirement, Requirement

    for text in requirements:
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            raise ValueError(f"requirement {text!r} is not valid: {exc}") from exc
        if text.strip().startswith("-"):
            raise ValueError(f"requirement {text!r}: pip options are not allowed")
    done = run(pip_command(requirements), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise ValueError(f"pip failed: {tail[-1] if tail else done.returncode}")
    return f"installed {', '.join(requirements)}; restart Easel to use them"

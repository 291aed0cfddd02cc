"""Who may log in, and what exposing the app to a network turns off.

Credentials come from `--auth "u:p,u2:p2"` and `--auth-file` (one `user:password` per line,
commas allowed, `#` comments). A password may be stored hashed as
`pbkdf2_sha256$<iterations>$<salt>$<hash>` (make one with `python -m pipelines.access hash`);
a user name written with a leading `@` (`@alice:...`) is an admin, who can see and cancel
every user's jobs. Passwords are compared in constant time.

Launch rules (A1111 #513 / PR #2925: a public link without a login let strangers run code):
`--share` without any user refuses to start; `--listen` without a user starts with a warning;
either of them turns extension installation off unless
`--enable-insecure-extension-access` is given.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

HASH_SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 260_000
ADMIN_MARK = "@"

SHARE_NEEDS_AUTH = (
    "--share puts this app on the public internet, so it needs a login: add "
    "--auth user:password (several: u1:p1,u2:p2) or --auth-file FILE (one user:password per "
    "line; hash passwords with `python -m pipelines.access hash`)")
LISTEN_WITHOUT_AUTH = (
    "!!! --listen without --auth/--auth-file: ANYONE on your network can use this app and read "
    "its outputs. Extension installation is disabled. Add --auth user:password to require a login.")


@dataclass(frozen=True)
class User:
    name: str
    secret: str  # the plain password, or a pbkdf2_sha256$... hash
    admin: bool = False

    def check(self, password: str) -> bool:
        if self.secret.startswith(HASH_SCHEME + "$"):
            return verify_password(password, self.secret)
        return hmac.compare_digest(self.secret.encode("utf-8"), password.encode("utf-8"))


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("ascii"), iterations)
    return f"{HASH_SCHEME}${iterations}${salt}${base64.b64encode(digest).decode('ascii')}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, expected = stored.split("$", 3)
        rounds = int(iterations)
    except ValueError:
        return False
    if scheme != HASH_SCHEME or not 1 <= rounds <= 10_000_000:
        return False
    return hmac.compare_digest(hash_password(password, iterations=rounds, salt=salt), stored)


def parse_credentials(entries: list[str], source: str) -> list[User]:
    users: list[User] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        admin = name.startswith(ADMIN_MARK)
        name = name.removeprefix(ADMIN_MARK).strip()
        if not sep or not name or not secret:
            raise ValueError(f"{source}: credentials must look like user:password, got '{name}{sep}…'")
        if any(u.name == name for u in users):
            raise ValueError(f"{source}: user '{name}' is listed twice; keep one line per user")
        users.append(User(name=name, secret=secret, admin=admin))
    return users


def load_users(auth: str | None, auth_file: Path | None) -> list[User]:
    """All users from --auth and --auth-file; [] when there is no login."""
    users = parse_credentials(auth.split(","), "--auth") if auth else []
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --auth-file {auth_file}: {exc.strerror}") from exc
        entries = [part for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#") for part in line.split(",")]
        from_file = parse_credentials(entries, str(auth_file))
        clash = {u.name for u in users} & {u.name for u in from_file}
        if clash:
            raise ValueError(f"user(s) {', '.join(sorted(clash))} given in both --auth and --auth-file")
        users += from_file
    return users


class Authenticator:
    """Gradio's `auth=` callable, plus who is an admin."""

    def __init__(self, users: list[User]) -> None:
        self._users = {u.name: u for u in users}
        self._stand_in = _stand_in_user(users)

    def __call__(self, username: str, password: str) -> bool:
        user = self._users.get(username)
        if user is None:
            # The same work as checking a real user, so timing does not tell which names exist.
            self._stand_in.check(password)
            return False
        return user.check(password)

    def is_admin(self, username: str | None) -> bool:
        user = self._users.get(username or "")
        return bool(user and user.admin)

    @property
    def usernames(self) -> list[str]:
        return list(self._users)

    @property
    def admins(self) -> list[str]:
        return [u.name for u in self._users.values() if u.admin]


def _rounds(secret: str) -> int | None:
    """The PBKDF2 iterations of a stored hash; None for a plain password (or a malformed hash)."""
    parts = secret.split("$", 3)
    if len(parts) != 4 or parts[0] != HASH_SCHEME or not parts[1].isdigit():
        return None
    return int(parts[1])


def _stand_in_user(users: list[User]) -> User:
    """Who an unknown name is checked against: a random secret of the costliest kind the real
    users have (a hash with the most PBKDF2 rounds any of them has, else a plain password), so
    an unknown name costs at least what a real one does. Hashed once, here."""
    rounds = [r for r in (_rounds(u.secret) for u in users) if r is not None]
    secret = secrets.token_urlsafe(18)
    if rounds:
        return User(name="", secret=hash_password(secret, iterations=min(max(rounds), 10_000_000)))
    return User(name="", secret=secret)


@dataclass(frozen=True)
class LaunchCheck:
    warnings: tuple[str, ...]


def check_launch(settings, users: list[User]) -> LaunchCheck:
    """Raise ValueError when the launch would be unsafe; return what to warn about."""
    if settings.share and not users:
        raise ValueError(SHARE_NEEDS_AUTH)
    warnings = []
    if settings.listen and not users:
        warnings.append(LISTEN_WITHOUT_AUTH)
    if settings.remote_access and settings.enable_insecure_extension_access:
        warnings.append("--enable-insecure-extension-access: extensions (arbitrary code) can be "
                        "installed by anyone who can log in over the network")
    return LaunchCheck(warnings=tuple(warnings))


def served_paths(settings) -> tuple[list[str], list[str]]:
    """Gradio's (allowed_paths, blocked_paths): only the outputs folder is served from disk
    (besides Gradio's own upload cache); models, config, hash cache, the auth file and
    installed extensions are blocked even if a later change allowed a parent folder."""
    allowed = [str(settings.outputs_dir.resolve())]
    blocked = [settings.models_root, settings.embeddings_root, settings.config_file, settings.cache_file,
               settings.data_dir / "extensions", settings.data_dir / "history.json"]
    if settings.auth_file:
        blocked.append(Path(settings.auth_file))
    return allowed, [str(Path(p).resolve()) for p in blocked]


def launch_report(settings, users: list[User], local_url: str | None, share_url: str | None) -> list[str]:
    """What to print once the server runs: where it is, who may log in, what went wrong."""
    lines = [f"Easel is running at {local_url}", login_summary(users)]
    if settings.share:
        if share_url:
            lines.append(f"public share link: {share_url} (Gradio's share server expires it after 72 hours, "
                         "or it ends when the app stops; restart for a new link)")
        else:
            lines.append("the share tunnel could not be opened (offline, or the share server is "
                         f"unreachable); the app keeps running locally at {local_url}")
    if not settings.extension_install_allowed:
        lines.append("extension installation is disabled because the app is reachable over the network")
    return lines


ADMIN_ONLY = "only admins (marked @name in the auth file) can {what}"


def shared_change_refusal(authenticator, username: str | None, what: str) -> str | None:
    """Why `username` may not change what every user shares (the REST API's default checkpoint,
    loading or unloading the model): with logins only admins may; without logins there is one
    (local) user, who may, as in A1111. None: allowed."""
    if authenticator is None:
        return None
    is_admin = getattr(authenticator, "is_admin", None)
    if is_admin is not None and is_admin(username):
        return None
    return ADMIN_ONLY.format(what=what) + ": it changes the server for every user"


def cancel_all_refusal(authenticator, username: str | None) -> str | None:
    """Cancelling everyone's jobs needs an admin login, with or without other logins."""
    is_admin = getattr(authenticator, "is_admin", None)
    if is_admin is not None and is_admin(username):
        return None
    return ADMIN_ONLY.format(what="cancel other users' jobs")


def login_summary(users: list[User]) -> str:
    if not users:
        return "no login: anyone who can reach the address can use the app"
    names = [f"{u.name} (admin)" if u.admin else u.name for u in users]
    return "users who may log in: " + ", ".join(names)


def _main(argv: list[str]) -> int:
    if argv[:1] != ["hash"]:
        print("usage: python -m pipelines.access hash   (reads a password, prints a hash for --auth-file)",
              file=sys.stderr)
        return 2
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""The path policy: which local paths and URLs a job may read (its prompt set) and write (its store).

The operator names folders at start: `--read-root` (prompt sets), `--write-root` (stores; a store is
read back too, so these are readable as well) and `--data-root` (both). A service started without
roots accepts no local path at all. The rules, applied when a job is submitted and again when it
starts (files can change in between; a restart may narrow the roots):

- a local path must be absolute and, both as written (after removing `.` and `..`) and after
  resolving every symlink, lie inside a root of its kind;
- a local prompt set is a regular file or a folder: a FIFO, device or socket would block the job
  thread that opens it;
- a prompt folder (a saved `datasets` folder) may hold no symlink that resolves outside the read
  roots, nor a FIFO, device or socket;
- the service's own files (its `--state` folder and token file) are never a job's prompts or store,
  nor inside or around one, even when a root holds them;
- `file://` URLs are local paths and follow the same rules;
- other URLs only with a scheme the operator allowed (`--allow-url-scheme s3`); none by default.
  Schemes that reach the local disk or wrap another filesystem (`local`, `simplecache`, `zip`...)
  cannot be allowed, and `::` (fsspec URL chaining) is refused everywhere.

A refused location is a `SpecError` naming the field; nothing outside the roots is opened to
decide, so no message can carry its contents. Checking and opening are two steps: someone who can
create symlinks inside a root can still race them, so keep roots writable only by people trusted
with the service's own file access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from potstill.teacher_gen.service.settings import ServeConfig, ServiceError, SpecError

# Schemes that read the local disk or another filesystem given in the URL: never allowed, since
# they would step around the roots.
UNSAFE_SCHEMES = frozenset({
    "file", "local", "asynclocal", "async_wrapper", "asyncwrapper", "dir", "reference", "generic",
    "simplecache", "filecache", "blockcache", "cached", "zip", "tar", "libarchive",
})
MAX_FOLDER_ENTRIES = 100_000  # a prompt folder with more entries than this is refused, not walked


@dataclass(frozen=True)
class Root:
    given: str  # as the operator wrote it, normalised
    real: str  # every symlink resolved

    def holds_written(self, path: str) -> bool:
        """`path` (normalised, symlinks not resolved) is inside the root as written or as resolved."""
        return _within(path, self.given) or _within(path, self.real)

    def holds_resolved(self, path: str) -> bool:
        return _within(path, self.real)


@dataclass(frozen=True)
class PathPolicy:
    read_roots: tuple[Root, ...]  # the write roots included
    write_roots: tuple[Root, ...]
    url_schemes: frozenset[str]
    private: tuple[str, ...]  # real paths of the service's own files

    @classmethod
    def from_settings(cls, settings: ServeConfig) -> PathPolicy:
        """The policy of a service; a root that is not a folder or an unsafe scheme fails in one line."""
        def roots(flag: str, folders: list[str]) -> list[Root]:
            out = []
            for folder in folders:
                if not os.path.isabs(folder):
                    raise ServiceError(f"--{flag} {folder}: give an absolute path")
                if not os.path.isdir(folder):
                    raise ServiceError(f"--{flag} {folder}: no such folder")
                out.append(Root(os.path.normpath(folder), os.path.realpath(folder)))
            return out

        data = roots("data-root", settings.data_root)
        write = data + roots("write-root", settings.write_root)
        read = write + roots("read-root", settings.read_root)
        for scheme in settings.allow_url_scheme:
            check_allowable_scheme(scheme)
        private = [os.path.realpath(settings.state)]
        if settings.token_file:
            private.append(os.path.realpath(settings.token_file))
        return cls(tuple(read), tuple(write), frozenset(settings.allow_url_scheme), tuple(private))

    # -- what the service and its jobs ask -------------------------------------------------------
    def prompts(self, location: str, field: str = "prompts") -> str:
        """Where a job reads its prompt set: the resolved local path, or the (allowed) URL."""
        local = self._local_path(field, location)
        if local is None:
            return location
        path = self._resolve(field, local, self.read_roots, "read", "--data-root or --read-root")
        if os.path.isdir(path):
            self._check_folder(field, local, path)
        elif os.path.exists(path) and not os.path.isfile(path):
            # a FIFO, device or socket would block (or never end) the job thread that opens it
            raise SpecError(field, f"{local} is not a regular file or a datasets folder")
        return path

    def store(self, location: str, field: str = "store") -> str:
        """Where a job writes its store: the resolved local path, or the (allowed) URL."""
        local = self._local_path(field, location)
        if local is None:
            return location
        return self._resolve(field, local, self.write_roots, "write", "--data-root or --write-root")

    def describe(self) -> dict[str, list[str]]:
        """The roots and schemes, as /health reports them."""
        return {"read_roots": _unique(r.given for r in self.read_roots),
                "write_roots": _unique(r.given for r in self.write_roots),
                "url_schemes": sorted(self.url_schemes)}

    # -- the rules -------------------------------------------------------------------------------
    def _local_path(self, field: str, location: str) -> str | None:
        """The local path a location names (a path or a file:// URL); None for an allowed remote URL."""
        if "\0" in location:
            raise SpecError(field, "the location holds a NUL character")
        if "::" in location:
            raise SpecError(field, f"{location!r}: chained URLs ('::') are not accepted")
        scheme, sep, rest = location.partition("://")
        if not sep:
            return location
        scheme = scheme.lower()
        if scheme == "file":
            host, slash, path = rest.partition("/")
            if host not in ("", "localhost") or not slash:
                raise SpecError(field, f"{location!r}: a file:// URL must name a path on this server "
                                       "(file:///path)")
            return "/" + path
        if scheme not in self.url_schemes:
            allowed = ", ".join(sorted(self.url_schemes)) or "none"
            raise SpecError(field, f"{location!r}: this service does not open {scheme}:// URLs (allowed: {allowed}; "
                                   f"the operator allows a scheme with --allow-url-scheme)")
        if not rest.strip("/"):
            raise SpecError(field, f"{location!r} names no path")
        return None

    def _resolve(self, field: str, path: str, roots: tuple[Root, ...], kind: str, flags: str) -> str:
        if not roots:
            raise SpecError(field, f"this service {kind}s no local paths: it was started without {flags}")
        if not os.path.isabs(path):
            raise SpecError(field, f"{path!r} is a relative path; give an absolute path on the server, "
                                   f"inside {_list(roots)}")
        if not any(root.holds_written(os.path.normpath(path)) for root in roots):
            # decided on the text alone: nothing outside the roots is touched
            raise SpecError(field, f"{path} is outside the folders this service may {kind} ({_list(roots)})")
        real = os.path.realpath(path)
        if not any(root.holds_resolved(real) for root in roots):
            raise SpecError(field, f"{path} leads outside the folders this service may {kind} "
                                   f"({_list(roots)}) through a symlink")
        if self._touches_own_files(real):
            raise SpecError(field, f"{path} is or holds the service's own files (its state folder or token file)")
        return real

    def _touches_own_files(self, real: str) -> bool:
        return any(_within(real, own) or _within(own, real) for own in self.private)

    def _check_folder(self, field: str, given: str, folder: str) -> None:
        """A prompt folder's entries must all stay inside the read roots."""
        seen = 0
        for parent, dirs, files in os.walk(folder):  # symlinked folders are listed, not followed
            for name in dirs + files:
                seen += 1
                if seen > MAX_FOLDER_ENTRIES:
                    raise SpecError(field, f"{given} holds more than {MAX_FOLDER_ENTRIES:,} entries; "
                                           "a prompt folder is a saved datasets folder")
                entry = os.path.join(parent, name)
                rel = os.path.relpath(entry, folder)
                if os.path.islink(entry):
                    real = os.path.realpath(entry)
                    if not any(root.holds_resolved(real) for root in self.read_roots) or self._touches_own_files(real):
                        raise SpecError(field, f"{given}: {rel} is a symlink leading outside the folders "
                                               "this service may read")
                if os.path.exists(entry) and not (os.path.isfile(entry) or os.path.isdir(entry)):
                    raise SpecError(field, f"{given}: {rel} is not a regular file or a folder")


def check_allowable_scheme(scheme: str) -> None:
    """An operator may allow a remote scheme fsspec can open, not one that reaches the local disk."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    if scheme in UNSAFE_SCHEMES:
        raise ServiceError(f"--allow-url-scheme {scheme}: {scheme}:// reaches the local disk or wraps another "
                           "filesystem; local paths (and file:// URLs) follow the roots instead")
    try:
        fs_class = fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as e:
        raise ServiceError(f"--allow-url-scheme {scheme}: the service cannot open {scheme}:// URLs ({e})") from None
    if issubclass(fs_class, LocalFileSystem):
        raise ServiceError(f"--allow-url-scheme {scheme}: {scheme}:// is the local disk; use the roots")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unique(items: object) -> list[str]:
    return list(dict.fromkeys(items))  # type: ignore[call-overload]


def _list(roots: tuple[Root, ...]) -> str:
    return ", ".join(_unique(r.given for r in roots))

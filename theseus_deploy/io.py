"""Write outputs so that a failed run leaves nothing half-written, and two runs never share one.

Every command builds its output in a temporary sibling folder (`.NAME.tmp-*`) and renames it into
place only when everything succeeded (rename is atomic on one file system). Around the whole run
it holds `output_lock(NAME)`: an `fcntl.flock` on `.NAME.lock` beside the output. The operating
system drops the lock when the process dies, so a second live run on the same output is refused
while a killed run can be resumed at once; the lock file is removed when the run ends. Holding the
lock also makes it safe to delete temp folders a killed run left behind (`.NAME.tmp-*`,
`.NAME.old-*`). Final outputs get the user's umask (mkdtemp/mkstemp alone would give 0700/0600,
unreadable to a server running as another user).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UsageError

_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: a process may nest locks on one output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _abs(path: str | os.PathLike) -> Path:
    """Absolute, `..`-free path without resolving the final symlink (`--output .` gets a real name)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


# File systems that are views of the kernel, not storage: an output there fails in odd ways
# (EACCES, EINVAL, files that exist and cannot be written) or writes into the kernel's settings.
PSEUDO_FS = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
             "configfs", "fusectl", "bpf", "pstore", "efivarfs", "mqueue", "hugetlbfs", "binfmt_misc", "autofs",
             "rpc_pipefs", "nsfs")
# Beside an output O we write .O.lock, .O.tmp-XXXXXXXX, .O.old-PID and O.partial: its name must
# leave room for them within the file system's name limit.
SIBLING_ROOM = 24


def _mount_type(path: Path) -> str | None:
    """The file system type of the mount `path` (an existing path) lies on, from /proc/self/mounts."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    best, kind = "", None
    p = str(path)
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (p == point or p.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def check_path(output: str | os.PathLike, what: str = "--output") -> Path:
    """Refuse output paths no run can write: empty, a name the file system cannot hold (with the
    temp names beside it), a path on a pseudo file system (/proc, /sys ...). Returns the absolute path."""
    if output is None or not os.fspath(output).strip():
        raise UsageError(f"{what} is empty: give a path")
    if "\x00" in os.fspath(output):
        raise UsageError(f"{what} contains a NUL character")
    out = _abs(output)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
        path_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in out.parts[1:]:
        n = len(os.fsencode(part))
        limit = name_max - SIBLING_ROOM if part == out.name else name_max
        if n > limit:
            raise UsageError(f"{what}: the name '{part[:40]}...' is too long for the file system ({n} bytes; at most "
                             f"{limit}{', leaving room for the temp and lock names beside it' if part == out.name else ''})")
    if len(os.fsencode(str(out))) + SIBLING_ROOM > path_max:
        raise UsageError(f"{what}: the path is too long for the file system ({len(os.fsencode(str(out)))} bytes)")
    kind = _mount_type(existing.resolve())
    if kind in PSEUDO_FS:
        raise UsageError(f"{what} {output} lies on a pseudo file system ({kind}), not storage: choose another path")
    return out


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


# The GLUE folder a run reads when no --data-dir is given (theseus_deploy/data.py: resolve_data_dir).
DATA_DIR_ENV = "THESEUS_DATA_DIR"


def check_not_inside(output: str | os.PathLike, protected=(), what: str = "--output") -> None:
    """Refuse an output that is, or contains, a protected path (the model, the data, the current
    folder): replacing it (`--overwrite`) or renaming over it would delete the source. An output
    inside a protected folder is refused too: a run never writes into its inputs (`bench
    --update-baseline M/config.json` would replace the model's own config; `export --task sst2
    --data-dir G --output G/SST-2 --overwrite` deleted SST-2's train.tsv and dev.tsv). The data folder
    of $THESEUS_DATA_DIR (the default --data-dir) is protected as well as the `protected` paths."""
    check_path(output, what)
    out = _abs(output).resolve()
    if out == out.parent:
        raise UsageError(f"{what} cannot be the file system root")
    # A protected entry may be `(path, what it is)`: another output of the same run (bench's
    # --output for its --update-baseline), protected whether or not it exists yet, and named by what
    # it is, not by its contents (bench's output holds a config.json, so it would read as a model).
    named = [(Path.cwd(), "the current folder")]
    for q in [*protected, os.environ.get(DATA_DIR_ENV)]:
        q, label = q if isinstance(q, tuple) else (q, None)
        if q and (label or os.path.exists(q)):
            named.append((q, label))
    for i, (p, label) in enumerate(named):
        src = _abs(p).resolve()
        if src == out or out in src.parents:
            raise UsageError(f"{what} {output} would replace {label if i == 0 else p}"
                             + ("" if src == out else " (it lies inside it)") + ": choose another output")
        if i and src in out.parents and (label or src.is_dir()):
            if label:
                raise UsageError(f"{what} {output} lies inside {p}, {label}: choose another path")
            kind = "the model folder" if _is_model_folder(src) else "the input folder"
            raise UsageError(f"{what} {output} lies inside {kind} {p}: a run never writes into its "
                             "inputs; choose another path")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, protected=()) -> Path:
    """Fail early (before any work) if `path` exists, is not empty and `overwrite` is off, or if
    it is (or contains) one of the `protected` paths or the current folder."""
    check_not_inside(path, protected)
    path = _abs(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path exists and is not a folder: {path}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder is not empty: {path} (pass --overwrite to replace it)")
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = False, protected=(), what: str = "--output") -> Path:
    """The same rules for a single output file (`evaluate --output`, `bench --update-baseline`)."""
    check_not_inside(path, protected, what)
    path = _abs(path)
    if path.is_dir():
        raise UsageError(f"{what}: output path is a folder, expected a file: {path}")
    if path.exists() and not overwrite:
        raise UsageError(f"{what}: output file exists: {path} (pass --overwrite to replace it)")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{what}: {path.parent} is not a folder")
    return path


def lock_path(output: str | os.PathLike) -> Path:
    out = _abs(output)
    return out.parent.resolve() / f".{out.name}.lock"


def _clean_stale(output: Path) -> None:
    """Delete temp folders/files of `output` left by a killed run (only ever called under the lock)."""
    prefixes = (f".{output.name}.tmp-", f".{output.name}.old-")
    with contextlib.suppress(OSError):
        for entry in output.parent.iterdir():
            if entry.name.startswith(prefixes):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


# The launchers' rank variables accelerate reads (accelerate.utils.environment): torchrun / accelerate
# launch, Intel MPI / MPICH, Open MPI, MVAPICH. RANK alone missed mpirun's processes (accelerate sets
# RANK only when its state is created): both raced for the lock, one exited 2, the other hung.
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _rank() -> int:
    """The global rank: the process group's once it exists, else the first launcher variable set."""
    if "torch" in sys.modules:  # a command that never imported torch has no process group
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return td.get_rank()
    return env_int(RANK_VARS, 0)


def env_int(names, default: int) -> int:
    """The first non-negative integer among the variables `names` (accelerate's get_int_from_env)."""
    for name in names:
        try:
            value = int(os.environ.get(name, -1))
        except ValueError:
            continue
        if value >= 0:
            return value
    return default


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, what: str = "--output", protected=None):
    """Hold an exclusive, OS-released lock on `output` for the duration; UsageError if another live
    process holds it. Re-entrant within a process; under a multi-process launch only global rank 0
    takes it (the ranks of one run share the output). Parent folders it had to create for the lock
    file are removed again if they are still empty at the end (a failed run creates nothing).
    `protected` (the run's inputs, as for check_not_inside) is checked before the lock file is made:
    an output refused for lying inside the model folder made `.NAME.lock` there first (and `bench
    --output O --update-baseline O/b.json` made O for that lock, then reported O as not empty)."""
    out = check_path(output, what)  # before anything is created for the lock
    if protected is not None:
        check_not_inside(output, protected, what)
    created = []
    d = out.parent
    while not d.exists():
        created.append(d)
        d = d.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError, FileNotFoundError) as e:
        raise UsageError(f"cannot create the folder of {what} {out}: {e.strerror or e}") from None
    lock = lock_path(out)
    key = str(lock)
    if key in _HELD or _rank() > 0:  # nested, or a non-main process of `accelerate launch`: rank 0 holds it
        _HELD.setdefault(key, [None, 0])
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
            if _HELD[key][0] is None and not _HELD[key][1]:
                del _HELD[key]
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
            raise UsageError(f"cannot write beside {what} {out} ({lock}: {e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UsageError(f"another run is writing {out}{holder}: wait for it to finish, or choose "
                                 f"another --output (lock {lock})") from None
            raise
        try:  # the previous holder may have removed the file between our open and flock: retry on the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD[key] = [fd, 1]
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _clean_stale(out)
        yield out
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: the next run retries on a fresh file
        os.close(fd)
        for c in created:  # innermost first
            with contextlib.suppress(OSError):
                c.rmdir()


def _apply_umask(root: Path) -> None:
    """Give `root` and everything in it the modes a plain mkdir/open would: mkdtemp makes 0700, and
    some writers (transformers 5 writes model.safetensors through mkstemp) leave files 0600."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                executable = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def argument_getter(fn, arg: str):
    """A function of (args, kwargs) giving the value of `fn`'s argument `arg` in a call: "output",
    or "cfg.output" for an attribute of an argument (None when absent)."""
    sig, (name, _, attr) = inspect.signature(fn), arg.partition(".")

    def get(args, kwargs):
        value = sig.bind(*args, **kwargs).arguments.get(name)
        return getattr(value, attr, None) if attr and value is not None else value

    return get


def protected_getter(fn, arg: str, protected):
    """A function of (args, kwargs) giving `protected(root)`, root being the argument `arg` names
    ("cfg" of "cfg.output"); None without `protected`."""
    root = argument_getter(fn, arg.partition(".")[0])
    return lambda args, kwargs: None if protected is None else protected(root(args, kwargs))


def locks_output(arg: str = "output", what: str = "--output", protected=None):
    """Decorator: the function runs under `output_lock` of its argument `arg` ("output", or "cfg.output"
    for an attribute of an argument); no lock when that value is None. `protected`: a function of
    that argument ("cfg") giving the run's inputs, refused as the output's place before the lock."""
    def decorate(fn):
        get, inputs = argument_getter(fn, arg), protected_getter(fn, arg, protected)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = get(args, kwargs)
            if value is None:
                return fn(*args, **kwargs)
            with output_lock(value, what, inputs(args, kwargs)):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, protected=()):
    """Yield a temporary folder; on success it replaces `path`, on error it is deleted. Holds
    `output_lock(path)` throughout."""
    with output_lock(path):
        path = check_output_dir(path, overwrite, protected)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            _apply_umask(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            if old.is_symlink():  # --output LINK --overwrite: the link is replaced, what it points to is left alone
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder (mode from the umask)."""
    path = _abs(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_safe(obj):
    """`obj` with NaN/inf floats as None: strict JSON parsers reject `NaN`."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (non-finite numbers become null)."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def safe_member(folder: str | os.PathLike, name: str, what: str = "file") -> Path:
    """`folder/name` for a name read from a file (a manifest): relative, no `..`, and, symlinks
    resolved, still inside `folder`; UsageError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UsageError(f"{folder}: invalid {what} name {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise UsageError(f"{folder}: {what} '{name}' points outside the folder (only plain relative names are allowed)")
    base = Path(folder).resolve()
    target = (base / p).resolve()
    if target != base and base not in target.parents:
        raise UsageError(f"{folder}: {what} '{name}' resolves outside the folder (to {target})")
    return target


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

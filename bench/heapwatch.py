#!/usr/bin/env python3
"""Run pyovpn under tracemalloc and write what its Python heap gained, for leak hunts.

    python3 bench/heapwatch.py OUT INTERVAL -- --config server.conf
    python3 bench/heapwatch.py --malloc-only OUT INTERVAL -- --config server.conf

Starts ``tracemalloc`` (15 frames), then runs ``python -m pyovpn`` with the arguments after
``--`` in this process. Every INTERVAL seconds a thread takes a snapshot: the first one (after
one interval, past start-up) is the baseline; each later one rewrites OUT with the 25 call
sites whose memory grew most since the baseline, and appends a line to OUT.totals: seconds
since start, the bytes Python objects hold (tracemalloc), and glibc's own count of the bytes
malloc has handed out and not got back (``mallinfo2().uordblks``, Python and native code such
as OpenSSL alike) and of the heap it holds from the system (``arena`` + ``hblkhd``). A leak in
Python shows as a call site that keeps growing; one in native code as malloc's in-use bytes
rising while tracemalloc's stay flat; fragmentation as the held heap rising while both stay
flat. tracemalloc's own tables live in malloc's heap and grow with every new traceback, so
malloc's counts are only clean with ``--malloc-only`` (no tracemalloc; the traced column is 0).
With ``--malloc-only`` each line also has CPython's small-object allocator's counts: arenas
(1 MiB mappings), pools in use (16 KiB each), bytes in its used blocks and bytes free inside
its used pools; OUT.classes has, per line, each size class as SIZE:POOLS:BLOCKS-IN-USE, to tell
which class's pools grow. Those arenas are mapped directly, not through malloc, and a pool first used
stays resident until its whole arena is free.
Two more censuses say who holds what grows: ``--lengths`` appends to OUT.lengths the dicts, lists,
sets and deques that got longer since the first census, with their owner (``Type.attribute``) and
last items; ``--untracked`` appends to OUT.untracked a count, by type and size, of the objects the
collector does not track (bytes, str, int, tuples and dicts of atoms: what ``--gc-census`` cannot
see) reachable from tracked ones, and which containers hold the most that are new. What grows in
the allocator's counts but in neither census is held outside Python objects (free lists, C code).
With ``--gc-census`` it instead runs a full collection every INTERVAL and appends to OUT.gc what
that collection found in reference cycles (garbage only the cyclic collector frees), by type, with
functions by name and frames by code location, and which types of live containers grew since
the first census. Cycles made at a steady rate are a leak until the
next full collection, and the small-object pools they fill stay resident after it.
``bench/soak.py --heapwatch OUT`` (``--heapwatch-malloc``, ``-gc``, ``-lengths``, ``-untracked``)
runs the server this way.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import linecache
import os
import re
import runpy
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from collections import Counter
from pathlib import Path
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_counts() -> tuple[int, int]:
    """(bytes in use, bytes held from the system) by glibc's malloc; (0, 0) without glibc."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return 0, 0
    fn.restype = _MallInfo2
    info = fn()
    return info.uordblks, info.arena + info.hblkhd


_PYMALLOC_LINE = re.compile(
    r"^# (arenas allocated current|bytes in allocated blocks|bytes in available blocks)\s*=\s*([\d,]+)"
)
_POOL_ROW = re.compile(r"^\s*\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+\s*$")


def _pymalloc_counts() -> tuple[int, int, int, int, dict[int, tuple[int, int]]]:
    """CPython's small-object allocator: (arenas, pools in use, bytes in used blocks, bytes free in
    used pools, and per size class: (pools, blocks in use)), read from ``sys._debugmallocstats()``.

    That function writes to the C-level stderr, so descriptor 2 is pointed at a scratch file for
    the call; a line the server writes to stderr in that millisecond ends up there too.
    """
    with tempfile.TemporaryFile() as scratch:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        scratch.seek(0)
        text = scratch.read().decode(errors="replace")
    lines = text.splitlines()
    found = {m.group(1): int(m.group(2).replace(",", "")) for m in map(_PYMALLOC_LINE.match, lines) if m}
    classes = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in map(_POOL_ROW.match, lines) if m}
    return (
        found.get("arenas allocated current", 0),
        sum(pools for pools, _blocks in classes.values()),
        found.get("bytes in allocated blocks", 0),
        found.get("bytes in available blocks", 0),
        classes,
    )


def _watch_malloc(out: Path, interval: float) -> None:
    start = time.monotonic()
    while True:
        time.sleep(interval)
        in_use, held = _malloc_counts()
        arenas, pools, used, free, classes = _pymalloc_counts()
        seconds = f"{time.monotonic() - start:.0f}"
        with open(f"{out}.totals", "a") as f:
            f.write(f"{seconds} 0 {in_use} {held} {arenas} {pools} {used} {free}\n")
        with open(f"{out}.classes", "a") as f:
            rows = " ".join(f"{size}:{p}:{b}" for size, (p, b) in sorted(classes.items()))
            f.write(f"{seconds} {rows}\n")


def _watch(out: Path, interval: float) -> None:
    start = time.monotonic()
    # the watcher's own allocations (formatting tracebacks reads source lines) are not pyovpn's
    keep = [tracemalloc.Filter(False, f) for f in (tracemalloc.__file__, __file__, linecache.__file__)]
    base: tracemalloc.Snapshot | None = None
    while True:
        time.sleep(interval)
        snap = tracemalloc.take_snapshot().filter_traces(keep)
        total = sum(s.size for s in snap.statistics("filename"))
        in_use, held = _malloc_counts()
        with open(f"{out}.totals", "a") as f:
            f.write(f"{time.monotonic() - start:.0f} {total} {in_use} {held}\n")
        if base is None:
            base = snap
            continue
        lines = [f"after {time.monotonic() - start:.0f} s; traced {total} bytes\n"]
        for stat in snap.compare_to(base, "traceback")[:25]:
            lines.append(f"\n{stat.size_diff:+d} B in {stat.count_diff:+d} blocks (now {stat.size} B)\n")
            lines += [f"    {line}\n" for line in stat.traceback.format()[-12:]]
        out.write_text("".join(lines))


def _garbage_census(garbage: list[Any]) -> Counter[str]:
    """What a collection freed, by type; functions by name and frames by code location, since
    those say where a cycle was made."""
    census: Counter[str] = Counter()
    for obj in garbage:
        kind = type(obj)  # not isinstance(): that reaches through a weak proxy to a dead referent
        if kind is types.FrameType:
            code = obj.f_code
            census[f"frame {Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}"] += 1
        elif kind is types.FunctionType:
            census[f"function {obj.__module__}.{obj.__qualname__}"] += 1
        else:
            census[kind.__qualname__] += 1
    return census


def _live_census() -> Counter[str]:
    """The objects the cyclic collector tracks (containers), by type."""
    return Counter(type(obj).__qualname__ for obj in gc.get_objects())


def _watch_garbage(out: Path, interval: float) -> None:
    start = time.monotonic()
    first: Counter[str] | None = None
    while True:
        time.sleep(interval)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            found = gc.collect()
            census = _garbage_census(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        # the saved garbage is still cyclic: collect it again for real, or every census counts it anew
        gc.collect()
        live = _live_census()
        first = first if first is not None else live
        grown = sorted(((n - first[what], what) for what, n in live.items()), reverse=True)
        with open(f"{out}.gc", "a") as f:
            f.write(f"{time.monotonic() - start:.0f} s: {found} objects in cycles\n")
            f.writelines(f"    {n:7d} {what}\n" for what, n in census.most_common(30))
            f.write(f"  live containers since the first census, most grown: {sum(live.values())} in all\n")
            f.writelines(f"    {n:+7d} {what}\n" for n, what in grown[:15])


_SIZED = (dict, list, set, collections.deque, bytearray)


def _container_lengths() -> dict[int, tuple[type, int]]:
    """id -> (type, length) of every live dict, list, set, deque and bytearray."""
    return {id(obj): (type(obj), len(obj)) for obj in gc.get_objects() if type(obj) in _SIZED}


def _owner(container: Any) -> str:
    """Where a container hangs: "Type.attr" of the object whose attribute it is, else its referrers' types."""
    found = []
    for ref in gc.get_referrers(container):
        if type(ref) is types.FrameType:
            continue
        attrs = ref if type(ref) is dict else vars(ref) if hasattr(ref, "__dict__") else None
        name = None
        if isinstance(attrs, dict):
            name = next((k for k, v in attrs.items() if v is container), None)
        if type(ref) is dict:
            # a dict that is some object's __dict__ (3.11 keeps most of those inside the object instead)
            holders = [o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
            where = f"{type(holders[0]).__qualname__}.{name}" if holders else None
            found.append(where or (f"dict[{name!r}]" if name else "dict"))
        else:
            found.append(f"{type(ref).__qualname__}.{name}" if name else type(ref).__qualname__)
    return ", ".join(found[:4]) or "no referrer"


def _sample(container: Any) -> str:
    """A short look at a container's last items, to say what it holds."""
    items = list(container.items())[-2:] if isinstance(container, dict) else list(container)[-2:]
    return repr(items)[:160]


def _watch_lengths(out: Path, interval: float) -> None:
    start = time.monotonic()
    first: dict[int, tuple[type, int]] | None = None
    while True:
        time.sleep(interval)
        lengths = _container_lengths()
        first = first if first is not None else lengths
        grown = sorted(
            (
                (n - first[key][1], key)
                for key, (kind, n) in lengths.items()
                if key in first and first[key][0] is kind and n > first[key][1]
            ),
            reverse=True,
        )[:12]
        wanted = {key for _n, key in grown}
        by_id = {id(obj): obj for obj in gc.get_objects() if id(obj) in wanted}
        with open(f"{out}.lengths", "a") as f:
            f.write(f"{time.monotonic() - start:.0f} s: {len(lengths)} sized containers; grown most:\n")
            for n, key in grown:
                obj = by_id.get(key)
                if obj is None:
                    continue
                f.write(f"    {n:+7d} now {len(obj):7d} {type(obj).__qualname__} at {_owner(obj)}\n")
                f.write(f"             {_sample(obj)}\n")
            del by_id


def _untracked(own: list[Any]) -> dict[int, tuple[str, int]]:
    """id -> (type, id of a tracked container that holds it) of every object the collector does not
    track (atoms such as bytes, str, int, and tuples and dicts of atoms) that a tracked container
    other than the watcher's ``own`` reaches, directly or through other untracked objects."""
    skip = {id(obj) for obj in own}
    holders = [obj for obj in gc.get_objects() if id(obj) not in skip]
    found: dict[int, tuple[str, int]] = {}
    skip.add(id(found))
    for holder in holders:
        if id(holder) in skip:
            continue
        stack = list(gc.get_referents(holder))
        while stack:
            obj = stack.pop()
            key = id(obj)
            if key in found or gc.is_tracked(obj):
                continue
            found[key] = (f"{type(obj).__qualname__}:{sys.getsizeof(obj)}", id(holder))
            if type(obj) in (tuple, dict):
                stack.extend(gc.get_referents(obj))
    return found


def _watch_untracked(out: Path, interval: float) -> None:
    start = time.monotonic()
    first: Counter[str] | None = None
    seen: dict[int, tuple[str, int]] = {}
    while True:
        time.sleep(interval)
        now = _untracked([seen, first, sys._getframe()])
        census = Counter(kind for kind, _holder in now.values())
        first = first if first is not None else census
        new = [(key, kind, holder) for key, (kind, holder) in now.items() if key not in seen]
        seen = now
        grown = sorted(((n - first[k], k) for k, n in census.items()), reverse=True)[:12]
        holders = Counter(holder for _key, _kind, holder in new)
        by_id = {id(obj): obj for obj in gc.get_objects() if id(obj) in holders}
        with open(f"{out}.untracked", "a") as f:
            f.write(f"{time.monotonic() - start:.0f} s: {len(now)} untracked objects; most grown types:\n")
            f.writelines(f"    {n:+7d} {kind}\n" for n, kind in grown)
            f.write("  containers holding the most objects that are new since the last census:\n")
            obj = None
            for holder, n in holders.most_common(8):
                obj = by_id.get(holder)
                what = f"{type(obj).__qualname__} len {len(obj)}" if hasattr(obj, "__len__") else type(obj)
                f.write(f"    {n:7d} in {what} at {_owner(obj) if obj is not None else '?'}\n")
                if obj is not None and type(obj) in _SIZED:
                    f.write(f"             {_sample(obj)}\n")
        # what the next census must not count as pyovpn's
        del by_id, new, holders, obj, now


_MODES = {
    "--malloc-only": _watch_malloc,
    "--gc-census": _watch_garbage,
    "--lengths": _watch_lengths,
    "--untracked": _watch_untracked,
}


def main() -> None:
    args = sys.argv[1:]
    mode = args[0] if args and args[0] in _MODES else None
    args = args[1:] if mode else args
    if len(args) < 3 or args[2] != "--":
        modes = " | ".join(_MODES)
        raise SystemExit(f"usage: heapwatch.py [{modes}] OUT INTERVAL -- PYOVPN-ARGS...")
    out, interval = Path(args[0]), float(args[1])
    if mode is None:
        tracemalloc.start(15)
    watch = _MODES[mode] if mode else _watch
    threading.Thread(target=watch, args=(out, interval), daemon=True, name="heapwatch").start()
    sys.argv = ["pyovpn", *args[3:]]
    runpy.run_module("pyovpn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

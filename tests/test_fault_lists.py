"""kill -9 while list files are rewritten (`data remap-list`, and every list the toolkit writes through
``atomic_write_text``): afterwards the list is the old or the new version, whole, and parses."""

from __future__ import annotations

import textwrap

import pytest
from _faults import kill_loop

from facesphere.data.lists import parse_list_file

N = 20_000  # entries: a write takes long enough (~1 MB) for kills to land inside it

WRITER = textwrap.dedent("""
    from pathlib import Path
    from facesphere.data.lists import remap_list_file
    folder = Path({folder!r})
    print("ready", flush=True)
    while True:
        for source in ("a.txt", "b.txt"):
            remap_list_file(folder / source, folder / "dense.txt")
            print(source, flush=True)
""")


@pytest.mark.slow
def test_kill_9_while_a_list_is_rewritten_leaves_the_old_or_the_new_list(tmp_path):
    # Two sources whose renumbered lists differ in every line: a = labels 0,3,6,...; b = the same paths reversed.
    (tmp_path / "a.txt").write_text("".join(f"img/{i:06d}.jpg {3 * i}\n" for i in range(N)))
    (tmp_path / "b.txt").write_text("".join(f"img/{i:06d}.jpg {3 * i}\n" for i in reversed(range(N))))
    versions = {name: [(p, i) for i, (p, _) in enumerate(parse_list_file(tmp_path / name))] for name in ("a.txt", "b.txt")}
    versions["b.txt"] = [(p, N - 1 - i) for i, (p, _) in enumerate(parse_list_file(tmp_path / "b.txt"))]
    seen = set()

    def check(run: int) -> None:
        target = tmp_path / "dense.txt"
        if not target.exists():
            return  # killed before the first write completed
        entries = parse_list_file(target)
        match = [name for name, expected in versions.items() if entries == expected]
        assert match, f"run {run}: dense.txt is neither version ({len(entries)} entries)"
        seen.update(match)

    result = kill_loop(WRITER.format(folder=str(tmp_path)), check, runs=4, max_delay_s=1.0)
    print(f"kill loop: {result}")
    assert result.mid_write >= result.runs // 2 and result.writes >= result.runs, result
    assert seen == {"a.txt", "b.txt"}
    stray = [p.name for p in tmp_path.iterdir() if p.name not in ("a.txt", "b.txt", "dense.txt")]
    assert all(name.startswith(".dense.txt.") and name.endswith(".tmp") for name in stray), stray  # hidden, never read

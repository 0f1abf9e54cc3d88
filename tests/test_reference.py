"""The reference material is in the clone and is what its provenance note (``tests/reference/README.md``) says."""

from __future__ import annotations

import hashlib
import re

from tests.conftest import GOLDEN, ROOT

NOTE = ROOT / "tests" / "reference" / "README.md"


def listed_hashes() -> dict[str, str]:
    """``{path: sha256}`` from the note's table rows: | `path` | `sha256` | ... |"""
    return dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|", NOTE.read_text(), flags=re.MULTILINE))


def test_every_reference_file_has_the_sha256_its_note_lists():
    hashes = listed_hashes()
    assert {GOLDEN.relative_to(ROOT).as_posix(), "dico/reference/paper_tables.json"} <= set(hashes)
    for path, expected in hashes.items():
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == expected, f"{path} differs from {NOTE.name}"


def test_the_goldens_hold_what_the_note_describes(golden):
    assert set(golden) == {"meta", "dico", "dit", "loss", "sample_250", "sample_ddim50"}
    assert golden["meta"] == {"seed": 0, "variant": "a"}
    assert golden["dico"]["out"].shape == (2, 8, 16, 16) and len(golden["dico"]["state_dict"]) == 99
    assert golden["dit"]["out"].shape == (2, 8, 8, 8) and len(golden["dit"]["state_dict"]) == 32

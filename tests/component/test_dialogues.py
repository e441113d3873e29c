"""The transcripts of tests/dialogues/, each played against the real listener it names.

One installation (alice: Maildir, bob: mbox) with the MSA, the MTA's listeners
and the MDA running in-process, no queue manager (tests/harness/services.py
`listeners`); the runner and the format: tests/harness/dialogue.py and
tests/dialogues/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import dialogue
from tests.harness.services import Stack, listeners

pytestmark = pytest.mark.timeout(60)

FOLDER = Path(__file__).resolve().parents[1] / "dialogues"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with listeners(tmp_path_factory.mktemp("dialogues") / "mailroom") as s:
        yield s


@pytest.mark.parametrize("path", sorted(FOLDER.glob("*.txt")), ids=lambda p: p.stem)
def test_dialogue(stack: Stack, path: Path) -> None:
    dialogue.run(path, stack)


def test_there_are_transcripts() -> None:
    assert len(list(FOLDER.glob("*.txt"))) >= 6

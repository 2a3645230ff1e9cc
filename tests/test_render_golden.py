"""`kproxy render` of the examples, whole text, in every mode: the files under tests/golden/
are what each mode printed when they were written (stdout, or the refusal on stderr of a mode
that cannot program the example). A change to a mode's rules shows here as a diff; regenerate a
file only for a change meant to alter what users see:

    .venv/bin/kproxy render --mode MODE -f examples/services/NAME.yaml > tests/golden/NAME.MODE.txt 2>&1
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from kproxy import cli
from kproxy.proxy import MODES

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
EXAMPLES = sorted((REPO / "examples" / "services").glob("*.yaml"))


def test_every_example_has_a_golden_render_in_every_mode() -> None:
    expected = {f"{example.stem}.{mode}.txt" for example in EXAMPLES for mode in MODES}
    assert expected == {path.name for path in GOLDEN.iterdir()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_render_prints_the_golden_text(example: Path, mode: str) -> None:
    """The golden text, or for an example the mode cannot program (userspace mode and a Local
    traffic policy), its one-line refusal on stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["render", "--mode", mode, "-f", str(example)])
    golden = (GOLDEN / f"{example.stem}.{mode}.txt").read_text()
    if golden.startswith("kproxy: error: "):
        assert (status, out.getvalue(), err.getvalue()) == (1, "", golden)
    else:
        assert (status, err.getvalue(), out.getvalue()) == (0, "", golden)

"""``python -m benchmarks.experiments``: a wrong name or rounds value is refused with a usage line."""
import pytest

from benchmarks.experiments.__main__ import EXPERIMENTS, main


@pytest.mark.parametrize("argv", [[], ["no_such_experiment"], ["stem", "x"], ["stem", "3", "extra"], ["stem", "0"],
                                  ["stem", "-1"]])
def test_bad_arguments_give_the_usage_line(argv, monkeypatch):
    # before, "0" passed isdigit() and ran the experiment, which crashed after compiling everything
    monkeypatch.setitem(EXPERIMENTS, "stem", lambda *rounds: pytest.fail("ran with rounds < 1"))
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value)
    assert "usage: python -m benchmarks.experiments <name> [rounds]" in message
    assert all(name in message for name in EXPERIMENTS)
    assert f"got {' '.join(argv) or 'no arguments'}" in message

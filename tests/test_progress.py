"""``labkit.widgets.Progress``: one progress bar for every bench; outside a kernel, plain tqdm."""

from labkit.widgets import Progress


def test_wrap_yields_every_item_in_order_and_counts_them(capsys):
    seen = list(Progress.wrap(iter([3, 1, 2]), "three"))
    assert seen == [3, 1, 2]
    assert "three: 100%" in capsys.readouterr().err  # the finished bar, 3/3


def test_a_disabled_bar_prints_nothing(capsys):
    bar = Progress(2, "quiet", enabled=False)
    bar.update()
    bar.update()
    bar.close()
    assert list(Progress.wrap([1], "quiet", enabled=False)) == [1]
    assert capsys.readouterr().err == ""

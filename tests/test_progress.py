import io

from attnfd_pipeline.progress import Progress


def test_log_lines_show_rate_counters_and_eta_once_at_the_end():
    out = io.StringIO()
    bar = Progress(4, "build", "samples", stream=out, log_every=3600)
    for _ in range(4):
        bar.update(1, counters={"MB": 0.5}, loss=0.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # non-tty: only the final line (log_every not reached), printed once
    line = lines[0]
    assert line.startswith("build: 4/4 samples") and "samples/s" in line and "MB/s" in line
    assert "loss=0.25" in line and "eta 00:00" in line


def test_disabled_prints_nothing():
    out = io.StringIO()
    bar = Progress(2, "x", stream=out, enabled=False)
    bar.update(2)
    bar.close()
    assert out.getvalue() == ""

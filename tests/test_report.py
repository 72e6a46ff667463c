"""Reports: explanation figures, tables, and the self-contained HTML page (checked in Chromium)."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from e2kd.cli import main
from e2kd.report import (
    curve_figure,
    explanation_figure,
    group_seeds,
    load_run,
    markdown_table,
    mean_std,
    normalise_map,
    terminal_table,
    training_curves_figure,
    write_html_report,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB")).astype(int)


# ---- figures ---------------------------------------------------------------------------------


def test_normalise_map_min_max_by_hand():
    np.testing.assert_allclose(normalise_map([[0.0, 1.0], [2.0, 4.0]]), [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(normalise_map([[-3.0, -1.0]]), [[0.0, 1.0]])
    np.testing.assert_array_equal(normalise_map(np.full((3, 3), 7.0)), np.zeros((3, 3)))  # highlights nothing
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalise_map([[0.0, float("nan")]])
    with pytest.raises(ValueError, match=r"one \(H, W\) map"):
        normalise_map(np.zeros((1, 2, 2)))


def test_explanation_figure_geometry_and_heat_map_colours(tmp_path):
    from matplotlib import colormaps

    # One grey image (0.2 everywhere), two columns: map hot on the left half, and the same map
    # scaled by 1000 and shifted, which per-map normalisation must render identically.
    images = np.full((1, 1, 8, 8), 0.2)
    m = np.zeros((1, 8, 8))
    m[:, :, :4] = 1.0
    path = tmp_path / "fig" / "explanations.png"
    data = explanation_figure(images, {"teacher": m, "student": 1000 * m + 5}, path, cell_inches=1.0, dpi=100, alpha=0.5)
    assert path.read_bytes() == data
    px = _png(data)
    # 3 columns of 100 px; 35 px of headings above 1 row of 100 px.
    assert px.shape == (135, 300, 3)
    y = 35 + 50
    # The image column shows the grey value 0.2 -> 51.
    np.testing.assert_allclose(px[y, 50], [51, 51, 51], atol=1)
    # Overlay = alpha * colormap(v) + (1 - alpha) * image, v = 1 on the left, 0 on the right.
    jet = colormaps["jet"]
    for v, x in ((1.0, 100 + 26), (0.0, 100 + 74)):
        expected = 255 * (0.5 * np.array(jet(v)[:3]) + 0.5 * 0.2)
        np.testing.assert_allclose(px[y, x], expected, atol=3)
    # Normalised per map: the scaled column is pixel-identical to the first.
    np.testing.assert_array_equal(px[38:132, 103:197], px[38:132, 203:297])


def test_explanation_figure_row_titles_and_low_resolution_maps():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 16, 16))
    data = explanation_figure(images, {"teacher": rng.random((2, 1, 4, 4))}, titles=["Sneaker", "Bag"], cell_inches=1.0, dpi=40)
    assert _png(data).shape == (94, 94, 3)  # (0.35 + 2 rows) x (0.35 + 2 columns) inches at 40 dpi


@pytest.mark.parametrize(
    "images, columns, kw, message",
    [
        (np.zeros((2, 1, 8, 8)), {"t": np.zeros((2, 3, 8, 8))}, {}, "3 channels"),
        (np.zeros((2, 1, 8, 8)), {"t": np.zeros((3, 8, 8))}, {}, "3 maps but there are 2 images"),
        (np.full((1, 1, 8, 8), 2.0), {"t": np.zeros((1, 8, 8))}, {}, r"must be in \[0, 1\]"),
        (np.zeros((1, 2, 8, 8)), {"t": np.zeros((1, 8, 8))}, {}, "C = 1 or 3"),
        (np.zeros((1, 1, 8, 8)), {}, {}, "non-empty mapping"),
        (np.zeros((2, 1, 8, 8)), {"t": np.zeros((2, 8, 8))}, {"titles": ["a"]}, "1 entries but there are 2 images"),
        (np.zeros((1, 1, 8, 8)), {"t": np.zeros((1, 8, 8))}, {"cmap": "nope"}, "unknown colour map"),
    ],
)
def test_explanation_figure_rejects_bad_input(images, columns, kw, message):
    with pytest.raises(ValueError, match=message):
        explanation_figure(images, columns, **kw)


def test_explanation_figure_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    data = explanation_figure(torch.rand(1, 1, 8, 8), {"t": torch.rand(1, 1, 8, 8, requires_grad=True)}, cell_inches=1.0, dpi=40)
    assert _png(data).shape == (54, 80, 3)


def test_curve_figure(tmp_path):
    shots = ["10", "50", "200", "all"]
    data = curve_figure(
        {"KD": (shots, [0.5, 0.6, 0.7, 0.8], [0.01, 0.02, 0.01, 0.0]), "e²KD": (shots, [0.55, 0.66, 0.74, 0.8])},
        tmp_path / "agreement.png",
        xlabel="images per class",
        ylabel="agreement",
        size_inches=(4, 3),
        dpi=50,
    )
    assert _png(data).shape == (150, 200, 3)
    numeric = curve_figure({"ViT": ([0, 1, 2, 4], [1.0, 0.9, 0.92, 0.8])}, logx=False, size_inches=(4, 3), dpi=50)
    assert _png(numeric).shape == (150, 200, 3) and numeric != data
    with pytest.raises(ValueError, match="x has 2 values, y 3"):
        curve_figure({"a": ([1, 2], [1, 2, 3])})
    with pytest.raises(ValueError, match="logx needs numeric"):
        curve_figure({"a": (["x", "y"], [1, 2])}, logx=True)


def test_training_curves_figure_only_draws_logged_metrics():
    recs = [{"step": s, "split": "train", "loss": 1 / s, "images_per_s": 100.0} for s in range(1, 5)]
    assert training_curves_figure({"a": recs}, keys=["agreement"]) is None
    data = training_curves_figure({"a": recs}, panel_inches=(2, 2), dpi=50)  # one panel: loss
    assert _png(data).shape == (100, 100, 3)


def test_training_curves_figure_reads_run_folders(tmp_path):
    run = _fake_run(tmp_path, "kd", seed=0, lam=0, accuracy=0.8)  # its metrics.jsonl has a torn last line
    data = training_curves_figure({"kd": run, "kd again": run / "metrics.jsonl"}, panel_inches=(2, 2), dpi=50)
    assert _png(data).shape == (100, 200, 3)  # two panels: loss, agreement
    with pytest.raises(FileNotFoundError, match="pass a run folder"):
        training_curves_figure({"x": tmp_path / "nope"})


# ---- tables ----------------------------------------------------------------------------------


def test_mean_std_by_hand():
    m, s = mean_std([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    assert mean_std([3.0]) == (3.0, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_markdown_table_by_hand():
    rows = [
        {"method": "KD", "accuracy": [0.80, 0.82, 0.84], "agreement": 0.9},
        {"method": "e²KD | GradCAM", "accuracy": 0.9, "agreement": None},
    ]
    assert markdown_table(rows, {"method": "method", "accuracy": "acc. (%)", "agreement": "agr."}, scale={"accuracy": 100}, digits=1) == (
        "| method | acc. (%) | agr. |\n"
        "| :--- | ---: | ---: |\n"
        "| KD | 82.0 ± 2.0 | 0.9 |\n"
        "| e²KD \\| GradCAM | 90.0 | – |\n"
    )
    with pytest.raises(ValueError, match="one number per seed"):
        markdown_table([{"a": [1, "x"]}], ["a"])
    with pytest.raises(ValueError, match="sequence of mappings"):
        markdown_table({"a": 1}, ["a"])


def test_terminal_table_by_hand():
    rows = [{"method": "KD", "accuracy": [0.80, 0.82, 0.84]}, {"method": "e²KD", "accuracy": 0.9}]
    assert terminal_table(rows, ["method", "accuracy"], title="Fashion-MNIST, 50 shots") == (
        "Fashion-MNIST, 50 shots\n"
        "method         accuracy\n"
        "------  ---------------\n"
        "KD      0.8200 ± 0.0200\n"
        "e²KD             0.9000\n"
    )


def test_group_seeds():
    recs = [
        {"method": "KD", "seed": 0, "accuracy": 0.8},
        {"method": "e2KD", "seed": 0, "accuracy": 0.9},
        {"method": "KD", "seed": 1, "accuracy": 0.82},
    ]
    assert group_seeds(recs, by=["method"], metrics=["accuracy"]) == [
        {"method": "KD", "accuracy": [0.8, 0.82], "seeds": 2},
        {"method": "e2KD", "accuracy": [0.9], "seeds": 1},
    ]
    with pytest.raises(ValueError, match="lacks the grouping key"):
        group_seeds([{"accuracy": 1.0}], by=["method"], metrics=["accuracy"])


# ---- run folders and the HTML page -----------------------------------------------------------


def _fake_run(root, name, *, seed, lam, accuracy, config_extra=""):
    d = root / name
    (d / "figures").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    (d / "config.yaml").write_text(f"name: {name}\nseed: {seed}\ndistill:\n  lam: {lam}\n  temperature: 1.0\n{config_extra}")
    lines = [json.dumps({"step": s, "epoch": s / 10, "split": "train", "loss": 2.0 / s, "agreement": 1 - 1 / s}) for s in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "split": "tr')  # torn last line
    results = {
        "accuracy": accuracy,
        "top5": 0.99,
        "agreement": 0.7 + 0.1 * lam,
        "explanation_similarity": 0.25 + lam / 8,
        "epg": 0.625,
        "val": {"accuracy": 0.5},
        "steps": 3,
    }
    (d / "results.json").write_text(json.dumps(results))
    Image.new("RGB", (37, 23), (200, 30, 30)).save(d / "figures" / "explanations.png")
    return d


def _data_uris(page: str):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_report_holds_values_images_and_escapes_text(tmp_path):
    hostile = "note: \"<script>alert('x')</script>\"\n"
    a = _fake_run(tmp_path, "kd_seed0", seed=0, lam=0, accuracy=0.8125)
    b = _fake_run(tmp_path, "kd_seed1", seed=1, lam=0, accuracy=0.8375)
    c = _fake_run(tmp_path, "e2kd_seed0", seed=0, lam=1, accuracy=0.8500, config_extra=hostile)
    (c / "figures" / "broken.png").write_text("not an image")
    out = write_html_report([a, b, c], tmp_path / "out" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # atomic: no temp file left

    # Values from results.json, in the comparison table and per run.
    for text in ("0.8125", "0.8375", "0.8500", "0.7000", "0.8000", "0.6250", "val.accuracy", "explanation_similarity", "epg"):
        assert text in page
    # Mean ± std of the two KD seeds, by hand: accuracy mean 0.825, std sqrt(2·0.0125²/1) = 0.0177.
    assert "0.8250 ± 0.0177" in page
    # The config keys that differ are listed; the torn metrics line was skipped (3 records).
    assert re.search(r"<th>distill\.lam</th>", page)
    assert page.count("metrics.jsonl: 3 records, last at step 3") == 3
    # Escaped text from files, never raw markup; the only script is the page's own.
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1
    # Self-contained: no external references.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page
    # The broken PNG is named, not silently dropped.
    assert "figures/broken.png: not a PNG file" in page
    # Embedded images: 1 training-curves figure + 3 run figures, all decodable PNGs.
    images = [Image.open(io.BytesIO(d)) for d in _data_uris(page)]
    assert len(images) == 4 and all(im.format == "PNG" for im in images)
    assert sum(im.size == (37, 23) for im in images) == 3
    assert all(np.asarray(im.convert("RGB"))[5, 5].tolist() == [200, 30, 30] for im in images if im.size == (37, 23))


def _edit_results(run, **changes):
    """Rewrite ``run``/results.json with ``changes``; a value of ``...`` removes the key."""
    res = json.loads((run / "results.json").read_text())
    for k, v in changes.items():
        if v is ...:
            del res[k]
        else:
            res[k] = v
    (run / "results.json").write_text(json.dumps(res))


def _section(page: str, anchor: str) -> str:
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2", start + 1)
    return page[start : end if end != -1 else len(page)]


def test_html_report_lists_every_metric_and_names_unfinished_runs(tmp_path):
    a = _fake_run(tmp_path, "a", seed=0, lam=0, accuracy=0.8125)
    b = _fake_run(tmp_path, "b", seed=1, lam=1, accuracy=0.9)
    _edit_results(b, accuracy=None, epg=..., iou=0.375)  # accuracy null, no epg, an iou only b has
    x = tmp_path / "x"
    shutil.copytree(a, x)
    (x / "results.json").unlink()  # an unfinished run
    page = write_html_report([a, x, b], tmp_path / "report.html").read_text(encoding="utf-8")
    results = _section(page, "comparison")
    assert '<p class="note">No results.json (unfinished, or not evaluated): x; their columns show “–”.</p>' in results
    rows = re.findall(r"<tr><th>([^<]+)</th>(.*?)</tr>", results.split("<tbody>")[1])
    assert [k for k, _ in rows] == [
        "accuracy", "top5", "agreement", "explanation_similarity", "epg", "iou", "val.accuracy", "steps",
    ]
    cells = {k: re.findall(r"<td[^>]*>([^<]*)</td>", v) for k, v in rows}
    assert cells["accuracy"] == ["0.8125", "–", "–"]
    assert cells["epg"] == ["0.6250", "–", "–"]
    assert cells["iou"] == ["–", "–", "0.3750"]
    assert cells["top5"] == ["0.9900", "–", "0.9900"]
    assert "No run folder has" not in page

    one = write_html_report([x], tmp_path / "one.html").read_text(encoding="utf-8")
    assert '<p class="note">The run folder has no results.json yet (unfinished, or not evaluated): x.</p>' in one
    y = tmp_path / "y"
    shutil.copytree(x, y)
    two = write_html_report([x, y], tmp_path / "two.html").read_text(encoding="utf-8")
    assert _section(two, "comparison") == (
        '<h2 id="comparison">Results</h2>'
        '<p class="note">None of the run folders has results.json yet (unfinished, or not evaluated): x, y.</p>\n'
    )


def test_html_report_warns_when_runs_were_evaluated_on_different_datasets(tmp_path):
    a = _fake_run(tmp_path, "a", seed=0, lam=0, accuracy=0.8125)
    b = _fake_run(tmp_path, "b", seed=1, lam=0, accuracy=0.9)
    _edit_results(a, dataset="fashion_mnist/test")
    _edit_results(b, dataset="mnist/test")
    page = write_html_report([a, b], tmp_path / "report.html").read_text(encoding="utf-8")
    results = _section(page, "comparison")
    assert (
        '<p class="note"><strong>Different datasets:</strong> the runs were evaluated on different data, so their '
        "metrics are not comparable (a: fashion_mnist/test; b: mnist/test).</p>"
    ) in results
    assert "<tr><th>dataset</th><td>fashion_mnist/test</td><td>mnist/test</td></tr>" in results
    # Same setting, seeds 0 and 1, but different data: not averaged as seeds of one setting.
    assert 'id="seeds"' not in page
    c = _fake_run(tmp_path, "c", seed=2, lam=0, accuracy=0.7)
    _edit_results(c, dataset=None)
    page = write_html_report([a, b, c], tmp_path / "report.html").read_text(encoding="utf-8")
    assert "not comparable (a: fashion_mnist/test; b: mnist/test; c: not recorded).</p>" in page

    _edit_results(b, dataset=...)
    page = write_html_report([a, b], tmp_path / "report.html").read_text(encoding="utf-8")
    assert (
        '<p class="note">The results.json of b names no dataset; it cannot be checked that it was evaluated on '
        "fashion_mnist/test like a.</p>"
    ) in page
    assert "<tr><th>dataset</th><td>fashion_mnist/test</td><td>–</td></tr>" in page

    _edit_results(b, dataset="fashion_mnist/test")
    page = write_html_report([a, b], tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Different datasets" not in page and "names no dataset" not in page
    assert "<tr><th>dataset</th><td>fashion_mnist/test</td><td>fashion_mnist/test</td></tr>" in page
    assert "0.8562 ± 0.0619" in _section(page, "seeds")  # (0.8125 + 0.9) / 2, |0.9 − 0.8125| / √2


def test_report_refuses_the_same_folder_twice(tmp_path, capsys):
    a = _fake_run(tmp_path, "a", seed=0, lam=0, accuracy=0.8)
    with pytest.raises(ValueError) as err:
        write_html_report([a, a], tmp_path / "report.html")
    assert str(err.value) == f"the same run folder is given twice: {str(a)!r} is {str(a)!r}; give each run folder once"
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a").symlink_to(a)
    for other in (tmp_path / "links" / ".." / "a", tmp_path / "links" / "a"):
        with pytest.raises(ValueError) as err:
            write_html_report([a, other], tmp_path / "report.html")
        assert str(err.value) == (
            f"the same run folder is given twice: {str(a)!r} and {str(other)!r} are both {str(a)!r}; "
            "give each run folder once"
        )
    assert main(["report", str(a), str(a), "-o", str(tmp_path / "report.html")]) == 2
    assert capsys.readouterr().err == (
        f"e2kd report: error: the same run folder is given twice: {str(a)!r} is {str(a)!r}; give each run folder once\n"
    )
    assert not (tmp_path / "report.html").exists()


def test_html_report_does_not_average_runs_that_share_a_seed(tmp_path):
    a = _fake_run(tmp_path, "a", seed=0, lam=0, accuracy=0.8)
    b = _fake_run(tmp_path, "b", seed=0, lam=0, accuracy=0.8)  # a rerun of a: same setting, same seed
    c = _fake_run(tmp_path, "c", seed=1, lam=0, accuracy=0.9)
    seeds = _section(write_html_report([a, b], tmp_path / "r.html").read_text(encoding="utf-8"), "seeds")
    assert (
        '<p class="note">Not averaged: a, b have the same setting and share seed 0. Runs with the same seed are '
        "repeats, not independent seeds; the mean ± std needs distinct seeds, so give each seed once.</p>"
    ) in seeds
    assert "<table>" not in seeds and "(n=" not in seeds
    seeds = _section(write_html_report([a, b, c], tmp_path / "r.html").read_text(encoding="utf-8"), "seeds")
    assert '<p class="note">Not averaged: a, b, c have the same setting but a, b share seed 0. Runs' in seeds
    assert "<table>" not in seeds and "(n=" not in seeds
    # A different data seed makes the runs independent: averaged, and the seeds column says so.
    d = _fake_run(tmp_path, "d", seed=0, lam=0, accuracy=0.9, config_extra="data:\n  seed: 1\n")
    seeds = _section(write_html_report([a, d], tmp_path / "r.html").read_text(encoding="utf-8"), "seeds")
    assert "<tr><th>a, d</th><td>0, 0 (data.seed 1)</td>" in seeds
    assert '<td class="num">0.8500 ± 0.0707 <small>(n=2)</small></td>' in seeds  # std: 0.1 / √2
    assert "Not averaged" not in seeds


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a run folder"):
        load_run(tmp_path / "empty")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "results.json").write_text("{accuracy: 1")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        load_run(d)
    (d / "results.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1}\nbroken\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_run(d)


def test_cli_report(tmp_path, capsys):
    run = _fake_run(tmp_path, "demo", seed=0, lam=1, accuracy=0.9)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "0.9000" in (run / "report.html").read_text()
    assert main(["report", str(run), str(tmp_path / "nope"), "-o", str(tmp_path / "cmp.html")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "cmp.html").exists()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/install-system-deps.sh installs it)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    rng = np.random.default_rng(0)
    run = _fake_run(tmp_path, "e2kd", seed=0, lam=1, accuracy=0.9)
    images = rng.random((2, 1, 28, 28))
    maps = rng.random((2, 1, 7, 7))
    explanation_figure(images, {"teacher": maps, "KD student": rng.random((2, 28, 28)), "e²KD student": maps}, run / "figures" / "grid.png", dpi=60)
    out = write_html_report([run], tmp_path / "report.html")
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        flags + ["--dump-dom", "--virtual-time-budget=5000", out.as_uri()], capture_output=True, text=True, timeout=180
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="true"' in dom.stdout and 'data-images-loaded="3/3"' in dom.stdout
    shot = tmp_path / "shot.png"
    res = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000", out.as_uri()], capture_output=True, timeout=180)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape == (2000, 1200, 3)
    non_white = (px.min(axis=2) < 240).mean()
    saturated = ((px.max(axis=2) - px.min(axis=2)) > 120).sum()  # heat maps and the red test figure
    assert 0.02 < non_white < 0.9 and saturated > 2000

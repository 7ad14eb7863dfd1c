"""Shards from anywhere webdataset reads them (issue 28): ``pipe:CMD``, ``http://`` (a local server on 127.0.0.1,
stopped by the fixture), ``file://``, plain paths and ``@FILE`` lists give the same samples in the same order; a
dropped connection is retried and counted, a truncated remote shard is a bad shard with its lost samples counted,
a failing command is one line with its exit status and what it said."""
import http.server
import os
import threading

import pytest

from megatron_ov3.data import DataConfig, DataIterator, REASONS
from megatron_ov3.data.shards import expand_urls, iter_tar_samples
from megatron_ov3.errors import UsageError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard folder; ``drop`` names shards whose first GET (in ``served``) is cut off mid-body, ``cut``
    shards always served truncated (as a store holding a short object)."""
    drop, cut, served = set(), set(), []

    def log_message(self, *a):
        pass

    def do_GET(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        self.served.append(name)
        path = os.path.join(self.directory, name)
        if name not in self.drop | self.cut or not os.path.isfile(path):
            return super().do_GET()
        body = open(path, "rb").read()
        first_drop = name in self.drop and self.served.count(name) == 1
        if name in self.cut:
            body = body[: len(body) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 3] if first_drop else body)
        if first_drop:
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops before Content-Length bytes


@pytest.fixture(scope="module")
def server(tiny_data):
    folder = os.path.dirname(tiny_data[0])
    handler = lambda *a, **kw: _Handler(*a, directory=folder, **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


def _keys(spec, tok, **kw):
    cfg = DataConfig(data_path=spec, tokenizer=tok, micro_batch_size=8, image_size=32, num_workers=0, shuffle_buffer=0,
                     epochs=1, drop_last=False, seed=3, shard_retry_backoff_s=0.05, **kw)
    it = DataIterator(cfg, 0, 1)
    seeds = [s for b in it for s in b["noise_seeds"].tolist()]
    return seeds, it.bad_counts()


def test_every_url_form_gives_the_plain_paths_samples_in_order(tiny_data, server, tmp_path):
    spec, tok = tiny_data
    base, folder = server
    listed = tmp_path / "shards.txt"
    listed.write_text("# a shard list\n" + "\n".join(expand_urls(spec)[0]) + "\n")
    want, bad = _keys(spec, tok)
    assert len(want) == 320 and not any(bad.values())
    for form in (f"pipe:cat {folder}/synthetic-{{00000..00007}}.tar", f"file://{folder}/synthetic-{{00000..00007}}.tar",
                 f"{base}/synthetic-{{00000..00007}}.tar", f"@{listed}", f"{folder}/synthetic-0000*.tar"):
        got, bad = _keys(form, tok)
        assert got == want and not any(bad.values()), (form, bad)


def test_a_dropped_connection_is_retried_and_a_short_object_is_a_bad_shard(tiny_data, server):
    spec, tok = tiny_data
    base, _ = server
    _Handler.drop, _Handler.cut, _Handler.served = {"synthetic-00001.tar"}, {"synthetic-00002.tar"}, []
    try:
        got, bad = _keys(f"{base}/synthetic-{{00000..00003}}.tar", tok)
    finally:
        _Handler.drop, _Handler.cut = set(), set()
    assert bad["shard_retry"] == 1  # the drop: retried once, the shard then read whole
    assert _Handler.served.count("synthetic-00001.tar") == 2
    # the short object is delivered without a transfer error: not retried, a bad shard with its lost samples
    assert _Handler.served.count("synthetic-00002.tar") == 1
    assert bad["bad_shard"] == 1 and 0 < bad["lost_sample"] < 40 and bad["lost_sample"] + len(got) == 160
    assert len(set(got)) == len(got)


def test_a_failing_command_is_counted_with_its_exit_status_and_words(tmp_path, capfd):
    errors = []
    samples = list(iter_tar_samples(f"pipe:cat {tmp_path}/missing.tar", lambda *a: errors.append(a), retries=1,
                                    backoff_s=0.01))
    assert samples == [] and [e[0] for e in errors] == ["shard_retry", "bad_shard"]
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert "exit 1" in line and "No such file or directory" in line and line.startswith("warning: shard pipe:cat")


def test_url_forms_that_name_nothing_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="cannot read the shard list"):
        expand_urls(f"@{tmp_path}/nothing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UsageError, match="names no shards"):
        expand_urls(f"@{tmp_path}/empty.txt")
    assert "shard_retry" in REASONS


@pytest.mark.slow
def test_training_from_url_forms_matches_the_plain_paths(tiny_data, server, tmp_path):
    """The done-when of issue 28: training from ``pipe:``, ``http://`` and ``file://`` specs of the same shards gives
    the plain paths' first losses with zero bad samples (in-process runs, one loader worker process each)."""
    import json

    from dist_utils import run_inprocess

    spec, tok = tiny_data
    base, folder = server
    forms = {"plain": spec, "pipe": f"pipe:cat {folder}/synthetic-{{00000..00007}}.tar",
             "http": f"{base}/synthetic-{{00000..00007}}.tar", "file": f"file://{folder}/synthetic-{{00000..00007}}.tar"}
    losses = {}
    for name, form in forms.items():
        r = run_inprocess("-m", "megatron_ov3.pretrain", "--data-path", form, "--tokenizer", tok, "--tiny-vae",
                          "--image-size", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
                          "--train-iters", "2", "--log-interval", "1", "--num-workers", "1",
                          "--metrics-file", tmp_path / f"{name}.jsonl")
        assert r.returncode == 0, (name, r.stderr[-2000:])
        records = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        assert all(not any(m["bad_samples"].values()) for m in records), (name, records[-1]["bad_samples"])
        losses[name] = [m["total_loss"] for m in records]
    assert all(v == losses["plain"] for v in losses.values()), losses

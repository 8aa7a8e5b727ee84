"""`segda bench stream`: W ranks x K loader workers, simulated in one process, reading real shards from real
HTTP and S3 servers on 127.0.0.1 that count the requests and bytes they serve.

    segda bench stream --world 64 --workers 8            # Cityscapes counts: 2,975 train, 500 val, shards of 256

Two readers of the same shards per source. The baseline is what plain webdataset does: whole shards dealt out to
the rank x worker slots (shuffled per epoch) and streamed from byte 0 through a shuffle buffer; evaluation streams
whole shards too. segda reads the indexed manifest sample by sample in a global per-epoch permutation. For one
training epoch and one evaluation pass it prints:

- bytes fetched / bytes used (the samples' own tar bytes) and requests per sample;
- exactly-once: every planned sample once (training: all but the N mod W remainder), and the batch counts per rank
  (the baseline's differ when shards do not divide evenly: DDP would hang or drop data);
- batch composition: mean distinct cities per training batch, divided by its expectation for a uniformly shuffled
  batch of the same size (1.0 = looks uniform; 1/E = every batch is one city);
- loader samples/s of this one process reading every slot in turn (decode and augmentation included), and its CPU
  time per sample (the servers run in their own processes);
- segda's epoch-boundary stall with a real DataLoader of K worker processes (rank 0 of W): the wait for the first
  batch of an epoch (mean over the 2 boundaries of 3 epochs) against the mean wait between the other batches.

The measurements run in a child process whose environment points S3 at the local server: this process's
environment is never changed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from math import comb
from pathlib import Path

import numpy as np

from segda.bench.servers import TRAFFIC_PATH
from segda.config import DataConfig
from segda.data.datasets import Dataset, resolve_dataset
from segda.log import info

MODES = ("baseline", "segda")


def make_cityscapes_like(root: Path, train: int, val: int, shard_size: int, size: tuple[int, int]) -> dict:
    """Small frames in the real Cityscapes cities and counts, as shards + an indexed and a legacy manifest each."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    manifests = {}
    for split, num in (("train", train), ("val", val)):
        legacy = root / "shards" / f"{split}-manifest-no-offsets.json"
        stamp = root / f"{split}.json"
        wanted = {"num": num, "shard_size": shard_size, "size": list(size)}
        if not (legacy.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
            synth_cityscapes(root / "raw", split, num, size=size, real_cities=True)
            create_shards("cityscapes", root / "raw", root / "shards", EncodeOptions("cityscapes", split),
                          CreateOptions(shard_size=shard_size, workers=1), progress=False)
            manifest = json.loads(manifest_path(root / "shards", split).read_text())
            for shard in manifest["shards"]:
                del shard["samples"]
            legacy.write_text(json.dumps(manifest))
            stamp.write_text(json.dumps(wanted))
        manifests[split] = {"segda": manifest_path(root / "shards", split).name, "baseline": legacy.name}
    return manifests


class _Server:
    """A loopback server (segda.bench.servers) in a child process, so that serving does not compete with the reader
    for this process's interpreter lock; its request and byte counters are read over HTTP."""

    def __init__(self, kind: str, where: Path, stack: ExitStack):
        self._proc = subprocess.Popen([sys.executable, "-m", "segda.bench.servers", kind, str(where)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(self._stop)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} server did not start (exit status {self._proc.wait()})")
        self.addresses = json.loads(line)
        self._control = self.addresses.get("url") or self.addresses["endpoint"]

    def traffic(self, reset: bool = False) -> tuple[int, int]:
        """(requests, body bytes) served since the last reset."""
        query = "?reset=1" if reset else ""
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever the env says
        with no_proxy.open(f"{self._control}{TRAFFIC_PATH}{query}", timeout=30) as resp:
            counts = json.loads(resp.read())
        return counts["requests"], counts["bytes"]

    def _stop(self) -> None:
        self._proc.stdin.close()  # the server's signal to shut down
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _serve(folder: Path, kinds: list[str], stack: ExitStack) -> dict[str, tuple[_Server, str, dict]]:
    """The shard folder served over HTTP and (when moto is installed) S3: {source: (server, base URL, the
    environment a client needs to reach it)}."""
    local = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    served = {}
    if "http" in kinds:
        server = _Server("http", folder, stack)
        served["http"] = (server, server.addresses["url"], local)
    if "s3" in kinds:
        try:
            import boto3
            server = _Server("s3", folder.parent / "moto_server.log", stack)
        except (ImportError, RuntimeError) as err:
            info(f"s3: skipped ({err}); `pip install -e .[dev]` installs moto")
            return served
        where = server.addresses
        access = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        client = boto3.session.Session().client("s3", endpoint_url=where["direct"], **access)
        for f in sorted(folder.iterdir()):
            if f.is_file():
                client.upload_file(str(f), where["bucket"], f"bench/{f.name}")
        env = {**local, "AWS_ENDPOINT_URL": where["endpoint"], "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        served["s3"] = (server, f"s3://{where['bucket']}/bench", env)
    return served


def city_composition(batches: list[list[str]], all_keys: list[str]) -> float:
    """Mean distinct cities per batch / the mean for uniformly drawn batches of the same sizes (1.0 = uniform)."""
    per_city = Counter(key.split("_")[0] for key in all_keys)
    total = len(all_keys)

    def expected(size: int) -> float:  # sum over cities of P(the city appears in a uniform batch of `size`)
        return sum(1 - comb(total - n, size) / comb(total, size) for n in per_city.values())

    observed = [len({k.split("_")[0] for k in b}) for b in batches]
    return statistics.mean(observed) / statistics.mean(expected(len(b)) for b in batches)


def _sample_sizes(indexed: Dataset) -> dict[str, int]:
    """Each sample's own tar bytes (headers, data, padding): what a reader cannot avoid fetching."""
    return {key: size for shard in indexed.shards for key, _, size in shard.samples}


def simulate_train_epoch(ds: Dataset, cfg: DataConfig, world: int, workers: int) -> dict:
    """segda: epoch 0 of every rank's every loader worker, read in turn in this process: batches (lists of keys),
    batch count per rank, seconds."""
    from segda.data.datasets import indexed_for_training
    from segda.data.stream import TrainStream, batches_per_epoch

    batches, per_rank = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for rank in range(world):
        indexed = indexed_for_training(ds, cfg, rank=rank, world=world)
        stream = TrainStream(indexed, cfg, rank=rank, world=world, seed=0,
                             num_batches=batches_per_epoch(indexed, cfg, world))
        keys = [b["key"] for w in range(max(workers, 1)) for b in stream.worker_iter(w)]
        per_rank.append(len(keys))
        batches += keys
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"batches": batches, "per_rank": per_rank, "seconds": seconds, "cpu_seconds": cpu}


def simulate_baseline_epoch(ds: Dataset, cfg: DataConfig, world: int, workers: int) -> dict:
    """Plain webdataset: epoch 0's shuffled shard list split by node, then by worker (shards[rank::W][k::K]), each
    shard streamed whole through a shuffle buffer and decoded, batches of consecutive samples."""
    from segda.data.augment import Augmenter
    from segda.data.reader import ShardReader

    frames = cfg.batch_size // cfg.crops_per_frame
    order = np.random.default_rng([0, 0, 0x5E6DA]).permutation(len(ds.shards)).tolist()
    batches, per_rank = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for rank in range(world):
        count = 0
        for worker in range(max(workers, 1)):
            reader = ShardReader(ds, timeout=cfg.timeout, retries=cfg.retries)
            augmenter = Augmenter(cfg, 0, bad=reader.bad)
            raw = (s for shard in order[rank::world][worker::max(workers, 1)] for s in reader.segment(shard))
            keys: list[str] = []
            for sample in _shuffled(raw, 64, np.random.default_rng([rank, worker])):
                augmenter.crops(sample, 0)
                keys.append(sample["__key__"])
                if len(keys) == frames:
                    batches.append(keys)
                    count, keys = count + 1, []
            if keys:
                batches.append(keys)
                count += 1
        per_rank.append(count)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"batches": batches, "per_rank": per_rank, "seconds": seconds, "cpu_seconds": cpu}


def _shuffled(samples, buffer_size: int, rng: np.random.Generator):
    buffer: list = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def simulate_eval(ds: Dataset, cfg: DataConfig, world: int, workers: int) -> dict:
    """One evaluation pass of every rank's every loader worker in this process: the keys read, seconds."""
    keys = []
    start = time.perf_counter()
    from segda.data.eval_stream import EvalStream

    for rank in range(world):
        stream = EvalStream(ds, cfg, rank=rank, world=world, batch_size=1)
        keys += [k for w in range(max(workers, 1)) for b in stream.worker_iter(w) for k in b["key"]]
    return {"keys": keys, "seconds": time.perf_counter() - start}


def _epoch_stall(ds: Dataset, cfg: DataConfig, world: int, epochs: int = 3) -> dict:
    """Rank 0 through a real DataLoader with worker processes over `epochs` epochs: the wait for the first batch
    of each new epoch against the waits between the other batches."""
    from segda.data.stream import TrainingData, batches_per_epoch

    per_epoch = batches_per_epoch(ds, cfg, world)
    waits, tick = [], time.perf_counter()
    data = TrainingData(ds, cfg, rank=0, world=world, seed=0)
    batches = iter(data)
    for _ in range(epochs * per_epoch):
        next(batches)
        now = time.perf_counter()
        waits.append(now - tick)
        tick = now
    data.close()
    # waits[0] is the run's start-up, paid once; epoch e starts at waits[e * per_epoch].
    boundaries = [waits[e * per_epoch] for e in range(1, epochs)]
    others = [w for i, w in enumerate(waits) if i % per_epoch]
    return {"boundary_wait_s": statistics.mean(boundaries), "mean_wait_s": statistics.mean(others or [0.0]),
            "batches_per_epoch": per_epoch}


def bench_stream(world: int, workers: int, *, data_dir: str | None = None, train: int = 2975, val: int = 500,
                 shard_size: int = 256, size: tuple[int, int] = (64, 32), batch: int = 8,
                 sources: tuple[str, ...] = ("http", "s3"), stall: bool = True) -> dict:
    import tempfile

    root = Path(data_dir or tempfile.mkdtemp(prefix="segda-bench-stream-"))
    manifests = make_cityscapes_like(root, train, val, shard_size, size)
    info(f"stream: {world} ranks x {workers} workers simulated in one process; {train} train / {val} val frames "
         f"of {size[0]}x{size[1]} in shards of {shard_size}; batch {batch}")
    results: dict = {"world": world, "workers": workers}
    with ExitStack() as stack:
        served = _serve(root / "shards", list(sources), stack)
        for source, (server, base, env) in served.items():
            for mode in MODES:
                job = {"base": base, "manifests": manifests, "mode": mode, "world": world, "workers": workers,
                       "batch": batch, "size": list(size), "stall": stall and mode == "segda"}
                server.traffic(reset=True)
                results[(source, mode)] = _measure_in_child(job, env, server)
    _print_table(results, list(served))
    return results


def _measure_in_child(job: dict, env: dict, server) -> dict:
    """Run `_measure` in a child process whose environment reaches the server; between its phases the child
    asks this process (over its stdin/stdout) to read and reset the server's counters."""
    proc = subprocess.Popen([sys.executable, "-m", "segda.bench.stream", json.dumps(job)], env={**os.environ, **env},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the measuring process failed (exit status {proc.wait()}); its errors are above")
        message = json.loads(line)
        if "result" in message:
            proc.wait()
            return message["result"]
        proc.stdin.write(json.dumps(server.traffic(reset=True)) + "\n")  # {"traffic": phase name}
        proc.stdin.flush()


def _measure(job: dict) -> dict:
    """In the child: one reader (segda or baseline) through one source; traffic read from the parent."""
    def traffic() -> tuple[int, int]:
        print(json.dumps({"traffic": True}), flush=True)
        return tuple(json.loads(sys.stdin.readline()))

    base, manifests, mode, world, workers = (job[k] for k in ("base", "manifests", "mode", "world", "workers"))
    cfg = DataConfig(batch_size=job["batch"], workers=workers, crop_size="16x16",
                     base_size="{}x{}".format(*job["size"]), photometric=False)
    train_ds = resolve_dataset(f"{base}/{manifests['train'][mode]}")
    val_ds = resolve_dataset(f"{base}/{manifests['val'][mode]}")
    sizes = _sample_sizes(resolve_dataset(f"{base}/{manifests['train']['segda']}"))
    val_sizes = _sample_sizes(resolve_dataset(f"{base}/{manifests['val']['segda']}"))
    all_train, all_val = list(sizes), list(val_sizes)
    traffic()  # zero the counters: resolving the manifests is not reading data
    simulate = simulate_train_epoch if mode == "segda" else simulate_baseline_epoch
    epoch = simulate(train_ds, cfg, world, workers)
    train_traffic = traffic()
    evaluation = simulate_eval(val_ds, cfg, world, workers)
    eval_traffic = traffic()
    trained = [k for b in epoch["batches"] for k in b]
    planned = len(all_train) - (len(all_train) % world if mode == "segda" else 0)
    row = {
        "train_bytes_ratio": train_traffic[1] / sum(sizes[k] for k in trained),
        "train_requests_per_sample": train_traffic[0] / len(trained),
        "train_exactly_once": len(trained) == len(set(trained)) == planned,
        "batches_per_rank": (min(epoch["per_rank"]), max(epoch["per_rank"])),
        "city_composition": city_composition(epoch["batches"], all_train),
        "train_samples_per_s": len(trained) / epoch["seconds"],
        "train_cpu_ms_per_sample": 1000 * epoch["cpu_seconds"] / len(trained),
        "eval_bytes_ratio": eval_traffic[1] / sum(val_sizes[k] for k in evaluation["keys"]),
        "eval_requests_per_sample": eval_traffic[0] / len(evaluation["keys"]),
        "eval_exactly_once": sorted(evaluation["keys"]) == sorted(all_val),
        "eval_samples_per_s": len(evaluation["keys"]) / evaluation["seconds"],
    }
    if job["stall"]:
        row.update(_epoch_stall(train_ds, cfg, world))
    return row


def _print_table(results: dict, bases: list[str]) -> None:
    world, workers = results["world"], results["workers"]
    print(f"\nW={world} ranks x K={workers} workers")
    print("| source | reader | train bytes/used | train req/sample | eval bytes/used | eval req/sample | "
          "exactly once (train, eval) | batches/rank | cities/batch vs uniform | train samples/s | "
          "reader CPU ms/sample | epoch-boundary wait (mean wait) |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---|")
    for source in bases:
        for mode in MODES:
            r = results[(source, mode)]
            stall = (f"{r['boundary_wait_s'] * 1000:.0f} ms ({r['mean_wait_s'] * 1000:.0f} ms)"
                     if "boundary_wait_s" in r else "-")
            print(f"| {source} | {mode} | {r['train_bytes_ratio']:.2f}x | {r['train_requests_per_sample']:.3f} | "
                  f"{r['eval_bytes_ratio']:.2f}x | {r['eval_requests_per_sample']:.3f} | "
                  f"{r['train_exactly_once']}, {r['eval_exactly_once']} | "
                  f"{r['batches_per_rank'][0]}-{r['batches_per_rank'][1]} | {r['city_composition']:.2f} | "
                  f"{r['train_samples_per_s']:.0f} | {r['train_cpu_ms_per_sample']:.2f} | {stall} |")
    for source in bases:
        base, ours = results[(source, "baseline")], results[(source, "segda")]
        print(f"{source}: bytes fetched per byte used, training {base['train_bytes_ratio']:.2f}x -> "
              f"{ours['train_bytes_ratio']:.2f}x, evaluation {base['eval_bytes_ratio']:.2f}x -> "
              f"{ours['eval_bytes_ratio']:.2f}x; loader speed ratio (segda / baseline): "
              f"{ours['train_samples_per_s'] / base['train_samples_per_s']:.2f}x")


if __name__ == "__main__":  # the measuring child of `_measure_in_child`
    print(json.dumps({"result": _measure(json.loads(sys.argv[1]))}), flush=True)

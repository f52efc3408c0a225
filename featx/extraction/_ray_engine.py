"""The Ray engine: extraction spread over the machines of a Ray cluster.

The files to embed are split into shards by content hash (:func:`plan_shards`), so a
shard's name depends only on the files in it and the cache key. A pool of Ray actors
(:class:`ShardEmbedder`, one per CPU) receives each shard's paths (not pixels); an actor
builds the model once and runs the local pipeline on its shard: decode on the
actor's machine, embed, write the shard file (temporary name, then rename) and a done
marker beside it. The driver alone writes the cache index, adopting the finished shards
(:meth:`featx.cache.CacheSession.adopt_shard`). A rerun after any failure finds the
finished shards by their markers, checks each against its checksum, and embeds only the
rest. The data folder and the cache folder must be on a filesystem every node sees.

A cluster with token authentication (Ray's default since 2.59) gets the token from where
Ray looks for it (:func:`use_available_token`); a refusal is one line that says why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from featx._backend import backend_name
from featx._io import json_sha256, text_sha256, write_text_atomic
from featx.backbones import create_backbone
from featx.cache import DONE_SUFFIX, ShardInfo, is_intact, write_shard
from featx.errors import FeatxError, UsageError

from ._engine import map_files
from ._quantize import cpu_isa
from ._runtimes import FlipAveraging, computed_by, describe, open_mapper, plan_device

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'featx[ray]'"
ROWS_PER_TASK = 2048  # files per shard: big enough to amortise a task, small to retry
CONNECT_TIMEOUT_S = 10
# Read by Ray when it is imported. Without them a cluster that does not answer is retried
# for minutes (20 tries of about 40 s were measured); with them Ray gives up in about 10 s.
# No usage statistics are sent from featx runs.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_NUM_REDIS_GET_RETRIES": "1",
           "RAY_gcs_rpc_server_connect_timeout_s": "2", "RAY_py_gcs_connect_timeout_s": "5",
           "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "5",
           "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5"}
ACTOR_RESTARTS = 2  # an actor that dies is restarted this often, then the run stops
AUTH_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file "
             "holding it (`ray get-auth-token` on the head node prints it)")


@dataclasses.dataclass(frozen=True)
class ShardTask:
    name: str  # the shard file's name: "ray-<digest of key and members>.h5"
    rows: np.ndarray  # indices into the columns of the files to embed


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to build its runtime; small and picklable."""

    backbone: dict  # create_backbone's arguments
    runtime: str
    precision: str
    batch_size: int
    store_dir: str
    int8_model: object  # featx.extraction.OnnxModel for int8, else None
    flip_average: bool
    root: str
    shard_dir: str
    decode_workers: int | None
    int8_isa: str | None = None  # the instruction set the int8 model was built for


def require_ray():
    """The ``ray`` module, or a UsageError saying how to install it."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    use_available_token()
    try:
        import ray
        import ray.util  # noqa: F401 - ActorPool
    except ImportError:
        raise UsageError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}"
                         ) from None
    return ray


def token_source() -> str | None:
    """Where Ray would read an authentication token from: the variable or file that holds
    one (never the token itself), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def use_available_token() -> None:
    """Send a token when one is available, as ``ray start`` does when it starts a cluster:
    RAY_AUTH_MODE=token unless RAY_AUTH_MODE says otherwise. A cluster without token
    authentication accepts such a client too.

    Ray reads its settings when it is imported; when it was imported before (a notebook),
    they are read again, unless a Ray session is open.
    """
    if "RAY_AUTH_MODE" not in os.environ and token_source():
        os.environ["RAY_AUTH_MODE"] = "token"
    ray = sys.modules.get("ray")
    if ray is None or not hasattr(ray, "is_initialized") or ray.is_initialized():
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def plan_shards(paths, sha256, key_digest: str, rows_per_task: int = ROWS_PER_TASK
                ) -> list[ShardTask]:
    """Split files into shards by content hash; the same files give the same shards.

    The number of shards is a power of two and a file's shard is given by the leading bits
    of its hash, so adding or removing a few files changes the members (and so the name) of
    the shards they fall in, not of every shard. A file that could not be read (no hash)
    is placed by a hash of its path; its actor records it as failed.
    """
    n = len(paths)
    if not n:
        return []
    bits = max(0, int(np.ceil(np.log2(max(1, -(-n // rows_per_task))))))
    keys = [h or text_sha256(str(p)) for p, h in zip(paths, sha256)]
    bucket = np.array([int(k[:8], 16) >> (32 - bits) for k in keys], dtype=np.int64)
    n_shards = 2 ** bits
    tasks = []
    for b in range(n_shards):
        rows = np.flatnonzero(bucket == b)
        if rows.size:
            members = [key_digest, sorted([str(paths[i]), str(sha256[i])] for i in rows)]
            digest = json_sha256(members)[:24]
            tasks.append(ShardTask(f"ray-{digest}.h5", rows))
    return tasks


def _fresh_marker(folder: Path, marker: dict) -> dict:
    """``marker`` of a shard an actor just wrote, checked against the file on disk (an
    actor restarted while its first attempt still ran may have rewritten it)."""
    if marker["rows"] and not is_intact(folder, shard_info(marker)):
        raise FeatxError(f"{folder / marker['name']}: changed after its actor finished it; "
                         "run the command again")
    return marker


def read_marker(shard_dir, name) -> dict | None:
    """The done marker of shard ``name`` if the shard is finished and intact, else None."""
    marker = Path(shard_dir) / (name + DONE_SUFFIX)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if done["rows"] and not is_intact(shard_dir, shard_info(done), full=True):
        log.warning("%s: fails its checksum; extracting it again", Path(shard_dir) / name)
        return None
    return done


def shard_info(done: dict) -> ShardInfo:
    return ShardInfo(done["name"], done["rows"], done["checksum"], done["size"],
                     done["mtime_ns"])


def embed_shard(item: dict, spec: WorkerSpec, mapper, preprocessing: dict, dim: int,
                made_by: dict | None = None) -> dict:
    """Decode, embed and write one shard; returns (and writes) its done marker, which
    carries ``made_by`` ({"runtime": ..., "computed_by": ...}: what embedded it)."""
    paths, sha256 = list(item["paths"]), list(item["sha256"])
    started = time.perf_counter()
    embeddings, errors = map_files(paths, preprocessing, mapper, dim, batch_size=spec.batch_size,
                                   root=Path(spec.root), workers=spec.decode_workers)
    ok = np.array([not error for error in errors], dtype=bool)
    folder = Path(spec.shard_dir)
    done = {"name": item["name"], "rows": int(ok.sum()), "checksum": "", "size": 0,
            "mtime_ns": 0, "seconds": time.perf_counter() - started,
            "failed": [[p, h, e] for p, h, e in zip(paths, sha256, errors) if e],
            "node": socket.gethostname(), "runtime": "", "computed_by": "",
            **(made_by or {})}
    if ok.any():
        columns = {"paths": np.asarray(paths, object)[ok], "sha256": np.asarray(sha256, object)[ok],
                   "view": np.zeros(int(ok.sum()), np.int16)}
        info = write_shard(folder / item["name"], dim, [embeddings[ok]], columns)
        done.update(checksum=info.checksum, size=info.size, mtime_ns=info.mtime_ns)
    write_text_atomic(folder / (item["name"] + DONE_SUFFIX), json.dumps(done))
    return done


class ShardEmbedder:
    """The Ray actor: builds the backbone and its runtime once, then embeds shards."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        if spec.int8_isa and spec.int8_isa != cpu_isa():
            raise UsageError(f"this Ray node's CPU is {cpu_isa()}, and the int8 model was built "
                             f"for {spec.int8_isa}: run int8 on nodes of one kind, or fp32")
        backbone = create_backbone(**spec.backbone)
        _, device = plan_device(spec.runtime, spec.precision, "cpu")  # no GPUs asked for
        mapper = open_mapper(backbone, spec.runtime, spec.precision, device, spec.store_dir,
                             spec.batch_size, spec.int8_model)
        self.mapper = FlipAveraging(mapper) if spec.flip_average else mapper
        self.preprocessing = backbone.preprocessing
        self.dim = getattr(mapper, "dim", None) or backbone.dim
        self.made_by = {"runtime": describe(mapper), "computed_by": computed_by(mapper)}

    def embed(self, item: dict) -> dict:
        """Embed one shard (``name``, ``paths``, ``sha256``); its done marker."""
        return embed_shard(item, self.spec, self.mapper, self.preprocessing, self.dim,
                           self.made_by)


def connect(ray, address: str | None, num_cpus: int | None) -> bool:
    """Join the cluster at ``address``, or start a local one; True when featx started it.

    ``extract`` has checked the address (:func:`check_address`) before any file was
    hashed; a cluster that accepts the connection but does not answer fails in about 10 s
    (:data:`RAY_ENV`) with one line, instead of Ray's own minutes of retries.
    """
    if ray.is_initialized():
        return False
    if not log.isEnabledFor(logging.DEBUG):  # Ray's INFO lines only with featx -v
        logging.getLogger("ray").setLevel(logging.ERROR)  # and ray.data's, its child
    # the actors run Keras on the driver's backend, whatever the nodes' default, and
    # refuse the images the driver would refuse
    env = {"KERAS_BACKEND": backend_name()}
    if os.environ.get("FEATX_MAX_IMAGE_PIXELS"):
        env["FEATX_MAX_IMAGE_PIXELS"] = os.environ["FEATX_MAX_IMAGE_PIXELS"]
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": env})
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:  # "local": a new Ray of featx's own, not one this machine already runs
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ray.exceptions.RayError) as exc:
        if not address:
            raise UsageError(f"--engine ray: cannot start a local Ray: {_first_line(exc)}"
                             ) from None
        _probe_cluster(ray, address)  # Ray logs the reason and raises "Failed to connect"
        raise UsageError(f"--ray-address {address}: cannot connect to a Ray cluster: "
                         f"{_first_line(exc)}") from None
    return True


def _first_line(exc) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _probe_cluster(ray, address: str) -> None:
    """A UsageError with the reason when the cluster's GCS refuses this client; nothing
    when it accepts it (or this Ray cannot ask)."""
    try:
        from ray._raylet import GcsClient
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except Exception as exc:  # noqa: BLE001 - every refusal becomes one line
        auth_error = getattr(ray.exceptions, "AuthenticationError", ())
        if isinstance(exc, auth_error) or "InvalidAuthToken" in str(exc):
            raise UsageError(_auth_message(address)) from None
        raise UsageError(f"--ray-address {address}: the Ray cluster refused the "
                         f"connection: {_first_line(exc)}") from None


def check_address(ray, address: str | None):
    """A UsageError unless a HOST:PORT address accepts a connection and its cluster lets
    this client in (other forms are left to Ray). ``ray``: from :func:`require_ray`."""
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)
        _probe_cluster(ray, address)


def _auth_message(address: str) -> str:
    source, mode = token_source(), os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode and mode != "token":
        return (f"--ray-address {address}: the Ray cluster wants an authentication token, and "
                f"RAY_AUTH_MODE={mode} sends none: unset it, and {AUTH_HELP}")
    if source is None:
        return (f"--ray-address {address}: the Ray cluster wants an authentication token and "
                f"none was found: {AUTH_HELP}")
    return (f"--ray-address {address}: the Ray cluster refused the authentication token from "
            f"{source}: {AUTH_HELP}")


def _check_reachable(address: str):
    host, _, port = address.rpartition(":")
    valid_port = len(port) <= 5 and port.isdecimal() and 0 < int(port) < 65536
    if not host or not host.isprintable() or not valid_port:
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS "
                         "address, port 6379 by default), 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode
        raise UsageError(f"--ray-address {address}: no Ray cluster answers there "
                         f"({getattr(exc, 'strerror', None) or exc}); start one with "
                         "`ray start --head`") from None


def run(session, columns: dict, spec: WorkerSpec, *, key_digest: str, address=None,
        num_cpus=None, rows_per_task: int | None = None, progress: bool = False) -> dict:
    """Embed the files in ``columns`` on Ray into shards the session adopts.

    Returns ``{"failed": [(path, sha256, reason)], "n_extracted", "n_reused_shards",
    "n_shards", "runtime", "computed_by", "seconds"}``.
    """
    started = time.perf_counter()
    folder = Path(spec.shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = plan_shards(columns["paths"], columns["sha256"], key_digest,
                        rows_per_task or ROWS_PER_TASK)
    done = {t.name: m for t in tasks if (m := read_marker(folder, t.name)) is not None}
    todo = [t for t in tasks if t.name not in done]
    n_extracted = 0
    if todo:
        for marker in _run_tasks(todo, columns, spec, address, num_cpus, progress):
            done[marker["name"]] = _fresh_marker(folder, marker)
            n_extracted += marker["rows"]  # images through the model, as the local engine
    failed, runtimes, computers = [], set(), set()
    for task in tasks:
        marker = done[task.name]
        failed.extend(tuple(row) for row in marker["failed"])
        runtimes.add(marker.get("runtime", ""))
        computers.add(marker.get("computed_by", ""))
        if marker["rows"]:
            _adopt(session, folder, task, marker, columns)
        else:  # every file failed: nothing to adopt, the marker goes with the next index
            session.remove_after_commit(folder / (task.name + DONE_SUFFIX))
    return {"failed": failed, "n_extracted": n_extracted, "n_shards": len(tasks),
            "runtime": ", ".join(sorted(r for r in runtimes if r)),
            "computed_by": sorted(c for c in computers if c),
            "n_reused_shards": len(tasks) - len(todo), "seconds": time.perf_counter() - started}


def _adopt(session, folder, task, marker, columns):
    import h5py

    with h5py.File(folder / task.name, "r", locking=False) as h5:
        shard_paths = h5["paths"].asstr()[:]
    where = {columns["paths"][i]: i for i in task.rows}
    if len(shard_paths) != marker["rows"] or not all(p in where for p in shard_paths):
        raise FeatxError(f"{folder / task.name}: does not hold the files its marker lists; "
                         "delete it and run the command again")
    rows = np.array([where[p] for p in shard_paths], dtype=np.int64)
    session.adopt_shard(shard_info(marker), {k: v[rows] for k, v in columns.items()},
                        marker=folder / (task.name + DONE_SUFFIX))


def _run_tasks(todo, columns, spec, address, num_cpus, progress):
    from tqdm.auto import tqdm

    ray = require_ray()
    started_here = connect(ray, address, num_cpus)
    items = [{"name": t.name, "paths": [str(columns["paths"][i]) for i in t.rows],
              "sha256": [str(columns["sha256"][i]) for i in t.rows]} for t in todo]
    bar = tqdm(total=len(items), unit="shard", disable=not progress, desc="extract (ray)",
               dynamic_ncols=True)
    try:
        n_actors = max(1, min(len(items), int(ray.available_resources().get("CPU", 1))))
        # Ray core actors, not Ray Data's pool: Ray Data passes its actors' constructor
        # arguments through the object store and restarts them without limit, which Ray
        # logs as an error on every run, and bounding restarts there needs its deprecated
        # ray_remote_args. Here the spec is small enough to travel inline.
        embedder = ray.remote(num_cpus=1, max_restarts=ACTOR_RESTARTS,
                              max_task_retries=ACTOR_RESTARTS)(ShardEmbedder)
        pool = ray.util.ActorPool([embedder.remote(spec) for _ in range(n_actors)])
        try:
            for marker in pool.map_unordered(lambda actor, item: actor.embed.remote(item),
                                             items):
                bar.update()
                yield marker
        except ray.exceptions.RayError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise FeatxError(f"ray: a shard failed ({type(exc).__name__}: {reason}); the "
                             "finished shards are kept: run the command again to resume"
                             ) from None
    finally:
        bar.close()
        if started_here:
            ray.shutdown()

"""What a consumer defines and gets back from the swarm.

- ``spec.py``: ``JobSpec`` (and its ``ModelSpec``, ``DataSpec``, ``TrainingSpec``, ``SwarmSpec``),
  ``load_job_file``, ``JobSpecError`` — the typed, validated job file.
- ``client.py``: ``Client`` (and the ``Job`` handle it returns) — submit through any peer, follow
  the job, download the verified result.
- ``datasets.py``: ``Dataset``, ``load_dataset``, ``DatasetError`` — csv / npz / image folders to arrays.
- ``shards.py``: ``shard_dataset``, ``DatasetManifest``, ``ShardInfo``, ``decode_shard``,
  ``ShardIntegrityError`` — content-addressed (sha256) safetensors shards and the manifest whose
  hash is the dataset id.
- ``catalog.py``: ``build_model``, ``count_parameters``, ``flops_per_sample``, ``ModelBuildError`` —
  the mlp / cnn / transformer catalog and custom build functions (imports torch).
- ``sharding.py``: ``order_rows``, ``row_lengths`` — the random / stratified / by_length row order.
- ``footprint.py``: ``estimate_footprint``, ``Footprint`` — one peer's memory and FLOPs for a job.
- ``report.py``: job status and the final report, computed from the swarm's records.
- ``cli.py``: the ``gpuflex`` command.

``Client`` is imported on first use (it starts hivemind, which imports torch).
"""

from swarm.spec import JobSpec, load_job_file

__all__ = ["Client", "JobSpec", "load_job_file"]


def __getattr__(name: str):
    if name == "Client":
        from swarm.client import Client

        return Client
    raise AttributeError(name)

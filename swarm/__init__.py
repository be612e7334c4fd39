"""What a consumer defines and gets back from the swarm.

- ``spec.py``: ``JobSpec`` (and its ``ModelSpec``, ``DataSpec``, ``TrainingSpec``, ``SwarmSpec``),
  ``load_job_file``, ``JobSpecError`` — the typed, validated job file.
- ``datasets.py``: ``Dataset``, ``load_dataset``, ``DatasetError`` — csv / npz / image folders to arrays.
- ``shards.py``: ``shard_dataset``, ``DatasetManifest``, ``ShardInfo``, ``decode_shard``,
  ``ShardIntegrityError`` — content-addressed (sha256) safetensors shards and the manifest whose
  hash is the dataset id.
- ``catalog.py``: ``build_model``, ``count_parameters``, ``flops_per_sample``, ``ModelBuildError`` —
  the mlp / cnn / transformer catalog and custom build functions (imports torch).
"""

from swarm.spec import JobSpec, load_job_file

__all__ = ["JobSpec", "load_job_file"]

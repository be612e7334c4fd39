"""Compile the Vyper contracts in ``ledger/contracts`` in process, with the ``vyper`` package.

There are no committed artefacts: the sources are the single truth and compile in about a
second each. :func:`compiled` caches per process; a deployment file (see ``ledger.chain``)
carries the ABIs, so a peer that only *reads* a deployment needs web3 but not the compiler.

``from snekmate...`` imports resolve through a ``FilesystemInputBundle`` whose search path is
the contracts folder plus the folder that holds the installed ``snekmate`` package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dht.errors import GPUFlexError

CONTRACTS_DIR = Path(__file__).resolve().parent / "contracts"
CONTRACT_NAMES = ("GPUX", "JobEscrow")
VYPER_VERSION = "0.4.3"


class ContractCompileError(GPUFlexError):
    """A contract could not be compiled (missing compiler or snekmate, or a source error)."""


@dataclass(frozen=True)
class CompiledContract:
    name: str
    abi: list
    bytecode: str  # 0x-prefixed deployment bytecode
    source_sha256: str  # of the contract's own source file


def _search_paths() -> list[Path]:
    spec = importlib.util.find_spec("snekmate")
    if spec is None or not spec.submodule_search_locations:
        raise ContractCompileError("snekmate is not installed: pip install snekmate==0.1.2")
    roots = {Path(p).resolve().parent for p in spec.submodule_search_locations}
    return [*sorted(roots), CONTRACTS_DIR]  # later entries take precedence in vyper


@functools.lru_cache(maxsize=None)
def compiled(name: str) -> CompiledContract:
    """ABI and bytecode of ``ledger/contracts/<name>.vy`` (cached for the process)."""
    if name not in CONTRACT_NAMES:
        raise ContractCompileError(f"unknown contract {name!r}; known: {', '.join(CONTRACT_NAMES)}")
    try:
        import vyper
        from vyper.compiler import compile_from_file_input
        from vyper.compiler.input_bundle import FilesystemInputBundle
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ContractCompileError(f"the Vyper compiler is not installed: pip install vyper=={VYPER_VERSION}") from e
    if not vyper.__version__.startswith(VYPER_VERSION):
        raise ContractCompileError(f"need vyper {VYPER_VERSION}, found {vyper.__version__}")
    source = CONTRACTS_DIR / f"{name}.vy"
    bundle = FilesystemInputBundle(_search_paths())
    try:
        out = compile_from_file_input(
            bundle.load_file(source.name), input_bundle=bundle, output_formats=["abi", "bytecode"]
        )
    except Exception as e:  # vyper raises its own exception tree; surface it as one line
        raise ContractCompileError(f"compiling {source.name} failed: {e}") from e
    return CompiledContract(
        name=name,
        abi=out["abi"],
        bytecode=out["bytecode"],
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
    )

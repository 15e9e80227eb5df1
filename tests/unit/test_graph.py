"""The stage graph is the one definition of the chain: everything else agrees with it."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.core import graph
from orchestrator.core.config import WORKER_KINDS, MeshConfig, StageConfig
from orchestrator.v1 import stages_pb2, types_pb2
from orchestrator.workers.registry import BUILDERS


def test_the_chain_in_data_flow_order() -> None:
    assert graph.STAGES == ("rag", "assemble", "inference", "post", "stream")
    assert graph.EDGE == "stream"
    assert graph.CALLEE == {"assemble": "rag", "inference": "assemble", "post": "inference", "stream": "post"}


def test_each_stage_names_a_real_rpc_and_its_output() -> None:
    services = set(stages_pb2.DESCRIPTOR.services_by_name)
    assert {s.service for s in graph.GRAPH} == services  # every service in stages.proto is a stage, and only those
    assert graph.stage("inference").rpc == "orchestrator.v1.InferenceService/Infer"
    assert graph.stage("rag").output is types_pb2.RagOutput
    assert graph.stage("stream").output is types_pb2.StreamChunk
    with pytest.raises(KeyError, match="the stages are rag, assemble"):
        graph.stage("nope")


def test_config_has_a_section_for_each_stage_and_no_other() -> None:
    sections = {
        f.name
        for f in dataclasses.fields(MeshConfig)
        if issubclass(getattr(MeshConfig(), f.name).__class__, StageConfig)
    }
    assert sections == set(graph.STAGES)


def test_config_and_registry_know_the_same_worker_kinds() -> None:
    assert tuple(BUILDERS) == WORKER_KINDS

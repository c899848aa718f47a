"""What a Flower message costs to move: adapters travel packed, and ClientApps start warm.

Flower moves every Array of a message as separate objects, one request each per hop; the
engine packs named arrays into one flat array per dtype (`records.to_array_record`). And in
deployment each SuperNode's ClientApps are forked from a warm executor (`clientapp_executor`)
that must not hold the model stack it would hand to every child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.superexec.executor import ExecutionSpec

from fedcollm.engines.flower import clientapp_executor, records


def _adapter(layers: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight": rng.standard_normal(
            (8, 576) if ab == "A" else (576, 8)
        ).astype(np.float32)
        for i in range(layers)
        for proj in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }


def test_packed_arrays_come_back_bit_exact_in_order_with_dtype_and_shape() -> None:
    arrays = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
        "a": np.array(3.5, dtype=np.float64),  # 0-d
        "empty": np.ones((0, 4), dtype=np.float32),
        "ids": np.array([1, -2], dtype=np.int64),
        "odd": np.array([np.nan, -0.0, np.inf], dtype=np.float32),
        "mask": np.array([True, False]),
    }
    back = records.from_array_record(records.to_array_record(arrays))
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name
    assert records.from_array_record(records.to_array_record({})) == {}


def test_a_lora_adapter_travels_as_a_handful_of_objects_not_one_per_tensor() -> None:
    adapter = _adapter()
    plain = ArrayRecord({name: Array(value) for name, value in adapter.items()})
    packed = records.to_array_record(adapter)
    assert len(get_all_nested_objects(plain)) > 2 * len(adapter)
    assert len(get_all_nested_objects(packed)) <= 5
    assert set(packed) == {records.PACKED_PREFIX + "<f4", records.PACKED_LAYOUT}


def test_packed_arrays_survive_the_wire() -> None:
    adapter = _adapter(layers=2)
    request = records.TrainRequest(rnd=1, experiment="name = 'x'\n", arrays=adapter)
    received = recorddict_from_proto(recorddict_to_proto(request.to_record()))
    back = records.TrainRequest.from_record(received)
    assert list(back.arrays) == list(adapter)
    assert all(back.arrays[k].tobytes() == adapter[k].tobytes() for k in adapter)


def test_a_record_of_plain_named_arrays_still_reads() -> None:
    plain = ArrayRecord({"w": Array(np.ones((2, 2), dtype=np.float32))})
    assert np.array_equal(records.from_array_record(plain)["w"], np.ones((2, 2), dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_reply_packs_its_adapter_too(dtype: type) -> None:
    arrays = {k: v.astype(dtype) for k, v in _adapter(layers=1).items()}
    result = records.TrainResult(client=0, num_examples=3, metrics={"train_loss": 1.0}, arrays=arrays)
    content = result.to_record()
    assert len(content.array_records[records.REPLY_ARRAYS]) == 2
    back = records.TrainResult.from_record(RecordDict(content))
    assert all(back.arrays[k].tobytes() == arrays[k].tobytes() for k in arrays)


def test_the_warm_clientapp_executor_holds_no_model_stack_to_fork() -> None:
    """A child forked from a process with torch's threads and allocator could hang; the executor
    imports what every ClientApp needs, and nothing of the model stack."""
    code = (
        "import sys\n"
        "from fedcollm.engines.flower.clientapp_executor import _warm_imports\n"
        "_warm_imports()\n"
        "assert 'fedcollm.engines.flower.client_app' in sys.modules\n"
        "print(','.join(sorted({'torch', 'transformers', 'peft'} & set(sys.modules))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _spec(task_type: TaskType) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9094",
        token="token-1",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=os.getpid(),
        suppress_output=True,
        task_id=1,
    )


def test_the_executor_runs_a_clientapp_task_in_a_forked_child_and_reaps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "child"

    def child(spec: ExecutionSpec, certificates: bytes | None) -> int:
        seen.write_text(f"{os.getpid()} {spec.token} {spec.runtime_api_address}")
        return 0

    monkeypatch.setattr(clientapp_executor, "_run_clientapp_child", child)
    executor = clientapp_executor.ForkingExecutor()
    assert executor.launch(_spec(TaskType.CLIENT_APP)).status == "accepted"
    (pid,) = executor.children
    deadline = time.monotonic() + 10
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "the finished child was not reaped"
    assert seen.read_text() == f"{pid} token-1 127.0.0.1:9094"


def test_the_executor_leaves_other_task_types_to_flowers_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = clientapp_executor.ForkingExecutor()
    handed: list[ExecutionSpec] = []
    monkeypatch.setattr(executor._fallback, "launch", lambda spec: handed.append(spec) or "flower")
    spec = _spec(TaskType.SERVER_APP)
    assert executor.launch(spec) == "flower"
    assert handed == [spec] and not executor.children

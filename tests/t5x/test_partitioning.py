"""`uncurl_jax.t5x_compat.partitioning.MoePjitPartitioner` on the 8 simulated CPU devices.

Its mesh holds expert partitions on CPU, and a function it partitions runs the MoE layers'
all-to-all path with gradients equal to the unsharded ones: the expert gradients are
already exact, which is why the gin/t5x/ run files switch off t5x's MoeTrainer rescaling
of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.train import losses

pytestmark = pytest.mark.t5x


@pytest.mark.parametrize("expert_partitions,model_partitions,shape", [
    (1, 1, (8, 1, 1)), (2, 1, (4, 2, 1)), (4, 2, (1, 4, 2)), (8, 1, (1, 8, 1)),
    (3, 1, (4, 2, 1)),   # t5x's rule: the largest divisor of 'data' not above the bound
])
def test_cpu_mesh_holds_expert_partitions(expert_partitions, model_partitions, shape):
  from uncurl_jax.t5x_compat import partitioning  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  partitioner = partitioning.MoePjitPartitioner(num_expert_partitions=expert_partitions,
                                                num_partitions=model_partitions)
  assert partitioner.mesh.axis_names == ("data", "expert", "model")
  assert partitioner.mesh.devices.shape == shape


def test_partitioned_step_runs_expert_parallel_with_exact_gradients():
  from uncurl_jax.t5x_compat import partitioning  # pylint: disable=import-outside-toplevel
  config = configs.get("tiny", num_experts=8, max_length=16, eval_capacity_factor=0.5,
                       min_capacity=1)
  model = decoder.SMoEDecoder(config)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, config.vocab_size, (8, 16)), jnp.int32)
  params = model.init(jax.random.key(0), tokens, tokens, enable_dropout=False)["params"]

  def loss(params, tokens):
    logits, state = model.apply({"params": params}, tokens, tokens, enable_dropout=False,
                                mutable=["intermediates"])
    return losses.lm_loss(logits, tokens, None, state["intermediates"],
                          aux_loss_coef=0.01, z_loss_coef=1e-3)[0]

  want = jax.jit(jax.grad(loss))(params, tokens)
  partitioner = partitioning.MoePjitPartitioner(num_expert_partitions=4, num_partitions=1)
  step = partitioner.partition(jax.grad(loss), in_axis_resources=(
      None, partitioner.data_partition_spec), out_axis_resources=None)
  assert "all_to_all" in step.lower(params, tokens).as_text()  # the shard_map path
  got = step(params, tokens)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6), got, want)
  expert_grad = got["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert float(jnp.abs(expert_grad).max()) > 0

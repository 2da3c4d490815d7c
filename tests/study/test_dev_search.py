"""The development search's choice rules (docs/study.md, "Choosing the finetuning on the
development split"), on made-up measurements."""

from uncurl_jax.study import dev_search


def _point(name, varies, bindings, references, reinit_after_warmup=40.0, agreement=0.1):
  pruned = {"32->8 uncurl (reinit)": (30.0, reinit_after_warmup, reinit_after_warmup),
            "32->8 uncurl (merge)": (42.0, 47.0, 47.0)}
  return dev_search.Point(name, varies, tuple(bindings), references, pruned, 0.3,
                          {"layers_0/mlp": agreement, "layers_2/mlp": agreement})


def test_the_largest_harmless_learning_rate_and_the_best_recovering_warmup_are_chosen():
  ft = "finetuning/TrainSettings"
  harmless = {"dense": (70.0, 70.5, 0.7), "+32e": (83.0, 83.0, 0.0)}
  harmful = {"dense": (70.0, 69.0, 0.9), "+32e": (83.0, 83.0, 0.0)}  # loses > 1 SE
  points = [
      _point("lr3e-6", "lr", [f"{ft}.learning_rate=3e-6"], harmless),
      _point("lr1e-5", "lr", [f"{ft}.learning_rate=1e-5"], dict(harmless, dense=(70, 69.4, 0.6))),
      _point("lr3e-5", "lr", [f"{ft}.learning_rate=3e-5"], harmful),
      _point("w10", "warmup", [f"{ft}.router_warmup_steps=10"], harmful, 37.5, 0.5),
      _point("w30", "warmup", [f"{ft}.router_warmup_steps=30"], harmful, 42.7, 0.1),
      _point("w60", "warmup", [f"{ft}.router_warmup_steps=60"], harmful, 42.7, 0.2)]
  assert [p.harmless for p in points[:3]] == [True, True, False]  # -0.6 is within 0.6
  chosen = dev_search.choose(points)
  assert chosen["lr"].name == "lr1e-5"                  # the largest harmless rate
  assert chosen["warmup"].name == "w60"                 # best score; agreement breaks ties
  text = dev_search.summary(points)
  assert "learning_rate=1e-5" in text.splitlines()[-1] and "| w30 |" in text
  assert dev_search.choose(points[2:3])["lr"] is None

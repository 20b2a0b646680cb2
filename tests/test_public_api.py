"""The public surface: what ``from flex_pbs import ...`` offers, pinned."""

import flex_pbs

PUBLIC = ["PBSConfig", "PBSPlan", "build_plan", "pbs_attention", "register", "unregister", "apply", "stats"]


def test_public_names_are_pinned_and_importable():
    assert flex_pbs.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(flex_pbs, name) is not None, name
    from flex_pbs import PBSConfig, build_plan, pbs_attention, register, stats  # noqa: F401


def test_public_names_come_from_the_engine_and_the_transformers_adapter():
    from flex_pbs.engine.config import PBSConfig
    from flex_pbs.engine.pipeline import PBSPlan, build_plan, pbs_attention
    from flex_pbs.integrations import transformers

    assert (flex_pbs.PBSConfig, flex_pbs.PBSPlan, flex_pbs.build_plan, flex_pbs.pbs_attention) == (
        PBSConfig, PBSPlan, build_plan, pbs_attention)
    assert flex_pbs.register is transformers.register and flex_pbs.stats is transformers.stats


def test_the_engine_imports_no_adapter():
    """Adapters depend on the engine, never the reverse: importing the engine loads neither
    transformers nor the runner, analysis or integrations."""
    import subprocess
    import sys

    code = ("import sys, flex_pbs.engine.pipeline, flex_pbs.engine.methods; "
            "bad = [m for m in sys.modules if m.startswith(('transformers', 'hydra', 'flex_pbs.runner', "
            "'flex_pbs.analysis', 'flex_pbs.integrations'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""What a sweep's config records of the fitting options: the gate's fields when a gate is fitted,
nothing new when not (so ungated sweeps keep their config hash and resume)."""

from __future__ import annotations

from acttransport.evaluate.grid import config_hash
from acttransport.evaluate.tasks.common import fit_config, t2i_fit_config
from acttransport.options import FitOptions


def test_sweeps_differing_only_in_their_gate_get_different_config_hashes():
    plain = FitOptions()
    gated = FitOptions(gate="probe")
    cfg = fit_config(gated)
    assert {k: cfg[k] for k in ("gate", "gate_rate", "gate_module", "gate_mode")} == {
        "gate": "probe", "gate_rate": gated.gate_rate, "gate_module": gated.gate_module, "gate_mode": gated.gate_mode}
    hashes = {config_hash(fit_config(o)) for o in (plain, gated, FitOptions(gate="ratio"), FitOptions(gate="probe", gate_rate=0.1),
                                                   FitOptions(gate="probe", gate_mode="token"))}
    assert len(hashes) == 5
    assert config_hash(t2i_fit_config(plain)) != config_hash(t2i_fit_config(gated))
    # ungated: no gate field at all (the hash older sweeps were stored under); the rate alone does not count
    assert not any(k.startswith("gate") for k in fit_config(plain))
    assert config_hash(fit_config(plain)) == config_hash(fit_config(FitOptions(gate_rate=0.1)))

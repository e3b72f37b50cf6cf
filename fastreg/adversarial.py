"""fastreg.adversarial: fused adversarial perturbation steps (FGSM, PGD).

See fastreg/ops/adversarial.py for the ops and docs/noise.md ("Adversarial").
"""

from fastreg.ops.adversarial import fgsm, fgsm_reference, pgd_step, pgd_step_reference

__all__ = ["fgsm", "pgd_step", "fgsm_reference", "pgd_step_reference"]

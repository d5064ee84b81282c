"""The analyses of "Towards Understanding the Long-Tailed Problem: A Unified Perspective".

- `toy`: Section 3's toy example (per-class accuracy as majority counts grow / the minority
  shrinks), `longtail study toy`.
- `mixup_similarity`: Section 4.2's simulation (a fraction rho of the majority's images mixed
  with minority images, Eq. 2), `longtail study mixup-similarity`.
- `gaussian`: Theorems 1 and 2 as Monte Carlo checks, `longtail study gaussian`.

docs/studies.md describes the readings chosen and the printed-formula discrepancy in Theorem 1.
"""

"""The call that docs/gpu.md profiles: compare_logits twice on 512x151936
fp32 CUDA tensors (a = randn * 2.5 + 4, b = a + 0.05 randn, CUDA targets),
for ncu with --launch-skip 1 --launch-count 1 (the second call's kernel).

    ncu --set full --import-source yes --clock-control none -k regex:CompareRows \\
        --launch-skip 1 --launch-count 1 -o prof python3 benchmarks/prof_gpu.py
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv
    python3 benchmarks/ncu_regions.py source.csv
"""

import torch

import logitparity as lp

g = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(512, 151936, generator=g, device="cuda") * 2.5 + 4.0
b = a + 0.05 * torch.randn(512, 151936, generator=g, device="cuda")
t = torch.randint(0, 151936, (512,), generator=g, device="cuda")
for _ in range(2):
    lp.compare_logits(a, b, targets=t)
torch.cuda.synchronize()

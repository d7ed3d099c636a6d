"""One FP16 GEMM and one FP16 convolution through PyTorch, for Nsight Compute's tensor-pipe
counters (run by ``device.py`` under ``ncu``). Shapes: GEMM 512 x 512 x 512 (134,217,728
MACs); convolution batch 8, 16 -> 32 channels, 32 x 32, 3 x 3, padding 1 (37,748,736 MACs);
then the GEMM's operands converted to E4M3 (two conversion kernels) and multiplied by
``torch._scaled_mm`` with fast accumulation (134,217,728 MACs). The operands are copied from
the host, so the other profiled kernels are the products' own."""

import numpy as np
import torch

torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
rng = np.random.default_rng(0)
a = torch.from_numpy(rng.standard_normal((512, 512)).astype(np.float16)).cuda()
b = torch.from_numpy(rng.standard_normal((512, 512)).astype(np.float16)).cuda()
x = torch.from_numpy(rng.standard_normal((8, 16, 32, 32)).astype(np.float16)).cuda()
w = torch.from_numpy(rng.standard_normal((32, 16, 3, 3)).astype(np.float16)).cuda()
torch.cuda.synchronize()
c = a @ b
torch.cuda.synchronize()
y = torch.nn.functional.conv2d(x, w, padding=1)
torch.cuda.synchronize()
print("gemm", tuple(c.shape), "conv", tuple(y.shape))
one = torch.ones((), device="cuda")
a8 = a.to(torch.float8_e4m3fn)
b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
torch.cuda.synchronize()
c8 = torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32,
                      use_fast_accum=True)
torch.cuda.synchronize()
print("fp8 gemm", tuple(c8.shape))

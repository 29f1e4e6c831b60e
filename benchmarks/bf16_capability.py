"""bfloat16 vs float32 for a conv layer's forward+backward (MNIST-sized, batch 32, 64 channels, one thread,
process CPU time, median-free mean of 5) and what fastcnf's ``bfloat16_native`` says, under torch's current
ATen capability (run it again with ATEN_CPU_CAPABILITY=avx2 to compare)."""
import time, torch
torch.set_num_threads(1)
print("capability", torch.backends.cpu.get_cpu_capability())
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastcnf.ode.solve import bfloat16_native
print("fastcnf bfloat16_native:", bfloat16_native("cpu"))
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
x = torch.randn(32, 64, 28, 28)
def run(dt, r=5):
    c = conv.to(dt); xi = x.to(dt).requires_grad_()
    c(xi).sum().backward()
    t = time.process_time()
    for _ in range(r):
        y = c(xi); y.sum().backward(); z = torch.tanh(y) * y + y  # some elementwise
    return (time.process_time() - t) / r * 1e3
f, b = run(torch.float32), run(torch.bfloat16)
print(f"conv fwd+bwd + elementwise: float32 {f:.1f} ms  bfloat16 {b:.1f} ms  bf16/f32 {b/f:.2f}")

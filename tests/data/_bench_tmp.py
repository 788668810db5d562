import sys, time, torch
from PIL import Image
import torchvision.transforms as T
from torch.utils.data import Dataset, DataLoader
from semckd_ray.data import Split, BatchLoader
N = 50000
imgs = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)
labels = torch.randint(0, 100, (N,))
mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
class PILSet(Dataset):
    def __init__(self):
        self.data = imgs.permute(0, 2, 3, 1).contiguous().numpy(); self.t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    def __len__(self): return N
    def __getitem__(self, k): return self.t(Image.fromarray(self.data[k])), int(labels[k])
def ours(**kw):
    loader = BatchLoader(Split(imgs, labels), mean, std, 64, augment=True, shuffle=True, **kw)
    best = 0
    for e in range(3):
        loader.set_epoch(e)
        if torch.cuda.is_available(): torch.cuda.synchronize()
        t = time.perf_counter(); n = 0
        for x, y, i in loader: n += len(y)
        if x.is_cuda: torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t))
    return best
def pil(workers, batches=200):
    best = 0
    for _ in range(2):
        it = iter(DataLoader(PILSet(), batch_size=64, shuffle=True, num_workers=workers)); next(it)
        t = time.perf_counter(); n = 0
        for b in range(batches): n += len(next(it)[1])
        best = max(best, n / (time.perf_counter() - t))
    return best
mode = sys.argv[1]
if mode == "cpu":
    for th in (2,):
        torch.set_num_threads(th)
        print(f"ours cpu threads={th}: {ours():,.0f} img/s; channels_last {ours(channels_last=True):,.0f}", flush=True)
    torch.set_num_threads(1)
    for w in (0, 2):
        print(f"PIL DataLoader num_workers={w}: {pil(w):,.0f} img/s", flush=True)
else:
    print(torch.cuda.get_device_name())
    print(f"ours cuda keep_on_device: {ours(device='cuda', keep_on_device=True):,.0f} img/s; +channels_last {ours(device='cuda', keep_on_device=True, channels_last=True):,.0f}")
    print(f"ours cuda from pinned cpu: {ours(device='cuda', pin_memory=True):,.0f} img/s")

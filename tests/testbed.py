"""A test bed that plants its answer (domino's ``SliceTestBed`` in spirit): a tiny world in
which blue is rare among t-shirts and nearly every trouser is blue (Waterbirds-style), and
a zoo of tiny CNNs trained on it here. The models really learn the shortcut, so blue
t-shirts really fail; nothing in the product's output is rewritten. The chain the tests
demand: a significant direction for t-shirts, a hard caption naming blue, and a synthetic
gain on the blue t-shirts of the held-out split. Its generator is the world renderer (the
data's own generator: an oracle, fine for a test of the mechanism)."""

from __future__ import annotations

TESTBED_SPEC = """
seed = 5
image_size = 16
items = ["t-shirt", "trouser", "sandal"]
colors = ["red", "green", "blue"]
backgrounds = ["brick", "grass", "gravel"]

[splits]
train = 900
debug = 240
test = 240
pool = 180

[[planted]]
class = "t-shirt"
attribute = "color"
value = "blue"
rate = 0.01
decoy = "trouser"
decoy_rate = 0.95
"""

TESTBED_ZOO = """
name = "testbed"
[defaults]
builder = "timm"
weights = "train"
input = { input_size = 16, mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }
train = { epochs = 6, batch_size = 32, lr = 0.005 }

[[models]]
name = "cnn-a"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }

[[models]]
name = "cnn-b"
family = "resnet"
arch = "resnet18"
kwargs = { layers = [1, 1, 1, 1], channels = [8, 16, 16, 16], stem_width = 8 }
train = { seed = 1 }
"""

#: the run's settings that give the planted failure the power to show (a p-value of 0.05
#: needs at least 19 permutations)
TESTBED_CONFIG = """
[data]
path = "{world}"
[zoo]
manifest = "{zoo}"
[ray]
batch_size = 64
[stats]
n_boot = 100
[directions]
n_permutations = 30
grounding_k = 20
k = 20
[generate]
k = 8
probe_k = 16
[mitigate]
lambdas = [0.5, 0.75]
pool_k = 20
k_nearest = 20
n_boot = 200
[report]
enabled = false
"""


def testbed_files(root) -> tuple[str, str]:
    """Write the test bed's world spec and zoo under ``root``: ``(spec path, zoo path)``."""
    (root / "testbed.toml").write_text(TESTBED_SPEC)
    (root / "testbed-zoo.toml").write_text(TESTBED_ZOO)
    return str(root / "testbed.toml"), str(root / "testbed-zoo.toml")


def testbed_config(path, world: str, zoo: str, extra: str = "") -> str:
    """An audit config of the test bed at ``path`` (``extra`` appended)."""
    path.write_text(TESTBED_CONFIG.format(world=world, zoo=zoo) + extra)
    return str(path)

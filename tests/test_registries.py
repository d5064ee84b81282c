"""Every component is registered: a module of losses/ or methods/ and data/sources.py define none
that its registry does not know.

The rule: a class defined in a module of `longtail.losses` that subclasses `Loss`, or in a
module of `longtail.methods` that subclasses `Method`, and a function named `load_*` defined in
`longtail.data.sources` (a source loader), must be an entry of LOSSES / METHODS / SOURCES.
Exempt: private names (a leading '_', e.g. `_ClassBalancedBase`, `_PostHoc`), the base classes
`Loss` and `Method` themselves and abstract classes (`inspect.isabstract`). The packages import
all their modules themselves (pkgutil), so registering is a matter of the decorator alone; a
fresh interpreter checks that importing the package is enough.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

from longtail import losses, methods
from longtail.data import sources
from longtail.losses import Loss
from longtail.methods import Method
from longtail.registry import LOSSES, METHODS, SOURCES, Registry


def registered(registry: Registry) -> set:
    return {registry.get(name) for name in registry.names()}


def package_modules(package: types.ModuleType) -> list[types.ModuleType]:
    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def unregistered_classes(module: types.ModuleType, base: type, registry: Registry) -> list[str]:
    """Public, concrete subclasses of `base` defined in `module` that `registry` does not hold."""
    known = registered(registry)
    return [f"{module.__name__}.{name}" for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and obj.__module__ == module.__name__
            and not name.startswith("_") and not inspect.isabstract(obj) and obj not in known]


def unregistered_loaders(module: types.ModuleType, registry: Registry) -> list[str]:
    """Functions named load_* defined in `module` that `registry` does not hold."""
    known = registered(registry)
    return [f"{module.__name__}.{name}" for name, obj in vars(module).items()
            if inspect.isfunction(obj) and name.startswith("load_") and obj.__module__ == module.__name__
            and obj not in known]


@pytest.mark.parametrize("package, base, registry", [(losses, Loss, LOSSES), (methods, Method, METHODS)],
                         ids=["losses", "methods"])
def test_every_loss_and_method_class_is_registered(package, base, registry):
    modules = package_modules(package)
    assert len(modules) > 5
    missing = [name for module in modules for name in unregistered_classes(module, base, registry)]
    assert not missing, f"defined but not registered (add @{registry.kind.upper()}S.register): {missing}"


def test_every_source_loader_is_registered():
    assert not unregistered_loaders(sources, SOURCES)
    assert {"cifar10", "cifar100", "imagefolder", "idx", "split_list", "digits", "arrays"} <= set(SOURCES.names())


def test_the_check_finds_an_unregistered_component():
    # the detector itself: a forgotten decorator is reported, private / base / registered ones are not
    fake = types.ModuleType("fake_losses")
    registry = Registry("loss")
    code = ("class Forgotten(Loss): pass\nclass _Helper(Loss): pass\n"
            "class Known(Loss): pass\ndef load_forgotten(cfg, progress=False): pass\n"
            "def load_known(cfg, progress=False): pass\ndef read_helper(path): pass\n")
    fake.__dict__["Loss"] = Loss
    exec(compile(code, "fake_losses.py", "exec"), fake.__dict__)  # noqa: S102  (a module built in the test)
    registry.register("known")(fake.Known)
    assert unregistered_classes(fake, Loss, registry) == ["fake_losses.Forgotten"]
    registry.register("known_loader")(fake.load_known)
    assert unregistered_loaders(fake, registry) == ["fake_losses.load_forgotten"]


def test_importing_a_package_registers_all_of_its_modules():
    # in a fresh interpreter (this one has imported everything by now): `import longtail.losses`
    # alone imports every module of the package, and so for methods and the data sources
    code = (
        "import pkgutil, sys\n"
        "import longtail.losses, longtail.methods, longtail.data\n"
        "from longtail.registry import SOURCES\n"
        "for pkg in (longtail.losses, longtail.methods):\n"
        "    missing = [m.name for m in pkgutil.iter_modules(pkg.__path__)\n"
        "               if f'{pkg.__name__}.{m.name}' not in sys.modules]\n"
        "    assert not missing, (pkg.__name__, missing)\n"
        "assert 'imagefolder' in SOURCES, SOURCES.names()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

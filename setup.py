"""Maps the top-level folders to ``linear_moe.<folder>``; all metadata lives in pyproject.toml."""
from setuptools import find_packages, setup

ROOTS = ("model", "kernels", "components", "pipelines")
PACKAGES = [f"linear_moe.{name}" for name in find_packages(include=[f"{r}" for r in ROOTS] + [f"{r}.*" for r in ROOTS])]

setup(
    packages=PACKAGES,
    package_dir={f"linear_moe.{root}": root for root in ROOTS},
    package_data={"linear_moe.components": ["**/*.yaml", "**/*.json"], "linear_moe.pipelines": ["**/*.yaml"]},
)

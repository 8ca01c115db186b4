"""Maps the repository's top-level folders onto one import root, `forge_lm`.

The metadata is in pyproject.toml; only what needs computing is here: every package below trainer/,
data/, launch/ and tools/ under its `forge_lm.` name, so a new subpackage needs no edit here.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("trainer", "data", "launch", "tools", "configs")

packages = ["forge_lm"]
package_dir = {"forge_lm": "forge_lm"}
for folder in SUBPACKAGES:
    packages += [f"forge_lm.{folder}"] + [f"forge_lm.{folder}.{p}" for p in find_packages(folder)]
    package_dir[f"forge_lm.{folder}"] = folder

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "forge_lm.configs": ["*.yaml", "*/*.yaml"],
        "forge_lm.data": ["corpora/*", "evalsets/**/*"],
        "forge_lm.trainer.serve": ["static/*"],  # the chat page of `forge serve`
    },
)

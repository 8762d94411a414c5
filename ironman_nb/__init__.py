"""ironman_nb: the helper package behind the persona fine-tuning notebooks.

Modules are imported by the notebooks one by one (`from ironman_nb.train import train`);
this package import stays light so the runner starts fast.
"""

__version__ = "0.1.0"

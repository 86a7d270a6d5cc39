"""mapbuild runtime: the code that ships inside a bundle and runs in the offline Kaggle kernel.

Only numpy, pandas, tokenizers and onnxruntime at module level: the builder imports this package for
everything that must be identical at training time and in the kernel.
"""

__version__ = "0.1.0"

"""deft_cli: the `deft` command line (`deft demo`, `deft density`, `deft bench`) and its tools: data loading
(data.py), density measurement and tables (density.py), timing and memory measurement (measure.py).

Uses transformers and PEFT without a Trainer; the Trainer integration is deft_hf.
"""

"""Fine-tuning: LoRA adapters (lora.py) and trainable subsets of the parameters
(trainable.py), used by jaxlm.train.trainer.Trainer."""

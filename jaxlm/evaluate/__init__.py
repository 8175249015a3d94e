"""Evaluation metrics for fine-tuning: classification, perplexity and generation (metrics.py)
and entity-level NER (ner.py), as thin layers over scikit-learn, sacrebleu, rouge-score and
seqeval that return plain dicts of floats for metrics.jsonl and TensorBoard."""

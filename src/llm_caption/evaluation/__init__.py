"""Evaluation metrics: captions (BLEU, METEOR, ROUGE-L, CIDEr-D) and Persian chat answers."""

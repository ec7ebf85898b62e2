"""Generation: `sequences` (sampling parameters, prompts, per-sequence state, the single-device loop),
`sampling` (token choice on the logits' device), `lm` (`LanguageModel` / `from_pretrained`: one device)."""

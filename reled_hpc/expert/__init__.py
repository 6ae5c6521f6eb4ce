"""Expert demonstrations for HPO: the ExpertSource interface (base), oracle experts (oracle), SED's
LLM expert (llm_expert: prompts, sandbox, navigation API, RVI/PDI indices) and the per-scenario
demonstration cache (cache)."""

"""Post-training on the same stack: supervised fine-tuning on chats (SFT), preference optimisation (DPO) and
distillation from a frozen teacher.

chat.py    chat templates (sandboxed Jinja, as transformers renders them), loss masks, the default template
data.py    conversation / prompt-completion / preference records -> packed micro-batches
dpo.py     the DPO losses and TRL's reward metrics; reference log-probabilities in one pass
distill.py forward KL(teacher || student) mixed with the next-token loss; the teacher's vocabulary checked
run.py     what a post-training run sets up before the engine trains (init_from, vocabulary, data)
config.py  `posttrain.*`
"""

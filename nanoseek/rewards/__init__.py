"""Rule-based rewards and answer checking, shared by GRPO training and evaluation (one verifier for both).

    from nanoseek.rewards import extract_answer, is_correct, accuracy_reward, format_reward, combine_rewards
    is_correct(extract_answer("<think>7+5=12</think> <answer>12</answer>"), ("12", "exact", {}))  # True

extract.py reads the answer out of a completion, verify.py decides if it is right (exact numbers,
math-verify, a safe Countdown evaluator), score.py turns that into reward functions. What is left
out on purpose: neural reward models (R1 §2.2.2: they invite reward hacking) and code execution.
"""

from .extract import canonical_answer, extract_answer, last_boxed, last_number, parse_number, strip_reasoning
from .score import (accuracy_reward, combine_rewards, format_reward, length_penalty, repetition_penalty,
                    tag_count_reward)
from .verify import KINDS, check_countdown, countdown_value, is_correct

__all__ = ["KINDS", "accuracy_reward", "canonical_answer", "check_countdown", "combine_rewards", "countdown_value",
           "extract_answer", "format_reward", "is_correct", "last_boxed", "last_number", "length_penalty",
           "parse_number", "repetition_penalty", "strip_reasoning", "tag_count_reward"]

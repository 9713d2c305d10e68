"""The llm_finetuning pipeline: chat splits -> every PEFT method measured -> best one registered."""

from kedro.pipeline import Node, Pipeline

from .nodes import compare_base_and_instruct, finetune_methods, register_best_method


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(finetune_methods,
             inputs=["chat_train", "chat_test", "params:llm_finetuning", "params:llm_models", "params:llm_model",
                     "params:seed"],
             outputs=["llm_method_results", "llm_loss_history", "llm_generations", "llm_release_results"],
             name="finetune_methods"),
        Node(compare_base_and_instruct,
             inputs=["chat_train", "chat_test", "params:llm_finetuning", "params:llm_models", "params:llm_model",
                     "llm_method_results", "params:seed"],
             outputs="llm_model_comparison",
             name="compare_base_and_instruct"),
        Node(register_best_method,
             inputs=["llm_method_results", "chat_train", "chat_test", "params:llm_finetuning", "params:seed"],
             outputs="llm_registry_decision",
             name="register_best_method"),
    ])

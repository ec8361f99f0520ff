"""One card writer for both front ends: the classifier and the SD card go through
``hf_munba.utils.model_card.build_model_card`` (``huggingface_hub.ModelCardData`` metadata)."""

import yaml

from hf_munba.utils import model_card


def test_both_cards_come_from_the_one_writer(monkeypatch):
    calls = []
    real = model_card.build_model_card

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(model_card, "build_model_card", spy)
    model_card.sd_model_card(base_model="org/sd", forgotten=["nudity"], retained=["a dog"],
                             hparams={"learning_rate": 1e-5})
    model_card.classifier_model_card(base_model="org/vit", method="salun", forget={"classes": [3]},
                                     munba_args={"salun_ratio": 0.3}, metrics={"acc_test": 90.0},
                                     dataset="digits")
    assert [c["library_name"] for c in calls] == ["diffusers", "transformers"]
    assert all(c["base_model"].startswith("org/") for c in calls)


def test_classifier_card_shows_enums_by_value_and_no_local_path(tmp_path):
    from transformers import TrainingArguments

    from hf_munba.classification.model_io import classifier_model_card, write_model_card

    targs = TrainingArguments(output_dir=str(tmp_path / "out"), optim="sgd",
                              lr_scheduler_type="constant", use_cpu=True, hub_token="hf_secret")
    kw = dict(base_model=str(tmp_path / "orig"), method="munba", forget={"fraction": 0.1},
              munba_args={"method": "munba", "forget_weight": 1.0},
              metrics={"acc_forget": 12.5, "acc_test": 91.25}, dataset=str(tmp_path / "imgs"),
              training_args=targs)
    card = str(classifier_model_card(**kw))
    assert "| optim | sgd |" in card and "| lr_scheduler_type | constant |" in card
    assert str(tmp_path) not in card and "hf_secret" not in card and "`orig`" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and meta["model-index"][0]["name"] == "munba-imgs"
    (tmp_path / "saved").mkdir()
    path = write_model_card(str(tmp_path / "saved"), **kw)
    assert open(path).read() == card

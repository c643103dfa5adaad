"""FAKE: the shape of EasyEdit's BaseEditor.__init__ (14cea82): ALG_DICT lookup, then a model loader picked by a
substring of model_name ('qwen3' here stands for the host's generic branches), NotImplementedError for other names;
a (model, tok) pair is taken as given."""

from ..util.alg_dict import ALG_DICT


class BaseEditor:
    @classmethod
    def from_hparams(cls, hparams):
        return cls(hparams)

    def __init__(self, hparams):
        self.model_name = hparams.model_name
        self.apply_algo = ALG_DICT[hparams.alg_name]
        if type(self.model_name) is str:
            if "qwen3" in self.model_name.lower():
                self.model, self.tok = "host-loaded model", "host-loaded tokenizer"
            else:
                raise NotImplementedError
        else:
            self.model, self.tok = self.model_name
        self.hparams = hparams

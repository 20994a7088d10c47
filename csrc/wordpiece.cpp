// A native WordPiece tokenizer for the texts where it provably equals Hugging Face's BERT pipeline
// (BertNormalizer -> BertPreTokenizer -> WordPiece), so the reward engine's host path is not bound by the
// Rust tokenizer's per-call overhead (measured ~15 us wall per short text on 2 cores; see RESULTS.md).
//
// Scope, on purpose narrow: a text is handled here only when every byte is printable ASCII (0x20-0x7E) or
// \t \n \r and it contains no added token (e.g. "[SEP]", matched case-insensitively). On those texts the
// normalizer reduces to ASCII lower-casing (no control characters to clean, no accents to strip, no CJK to
// space out), and the pre-tokenizer to: split on whitespace, isolate each ASCII punctuation character.
// Every other text is reported back as "not handled" (None) and the caller tokenises it with Hugging Face.
// The Python side (optimas_fast/reward/wordpiece.py) builds this object only from a tokenizer.json whose
// pipeline is exactly that one; tests compare ids with Hugging Face's on random and real texts.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace optimas {
namespace {

uint64_t fnv1a(const char* s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(s[i]);
    h *= 1099511628211ull;
  }
  return h;
}

// string -> id, open addressing over one byte arena (lookups take a (pointer, length) view: no allocation).
class VocabTable {
 public:
  void build(const std::vector<std::pair<std::string, int32_t>>& items) {
    size_t cap = 16;
    while (cap < items.size() * 2 + 1) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    arena_.clear();
    for (const auto& [s, id] : items) insert(s, id);
  }

  // -1 when absent
  int32_t find(const char* s, size_t n) const {
    if (slots_.empty()) return -1;
    uint64_t h = fnv1a(s, n);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& e = slots_[i];
      if (e.id < 0) return -1;
      if (e.hash == h && e.len == n && std::memcmp(arena_.data() + e.off, s, n) == 0) return e.id;
    }
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0;
    uint32_t len = 0;
    int32_t id = -1;
  };

  void insert(const std::string& s, int32_t id) {
    uint64_t h = fnv1a(s.data(), s.size());
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      Slot& e = slots_[i];
      if (e.id < 0) {
        e = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(s.size()), id};
        arena_.append(s);
        return;
      }
      if (e.hash == h && e.len == s.size() && arena_.compare(e.off, e.len, s) == 0) return;  // first id wins
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  std::string arena_;
};

bool is_ascii_punct(unsigned char c) {
  return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126);
}

class WordPiece {
 public:
  WordPiece(const py::list& vocab, int32_t unk_id, const std::string& prefix, int64_t max_chars, bool lowercase,
            const py::list& added)
      : unk_id_(unk_id), max_chars_(max_chars), lowercase_(lowercase) {
    if (max_chars < 1) throw py::value_error("WordPiece: max_input_chars_per_word must be >= 1");
    std::vector<std::pair<std::string, int32_t>> words, conts;
    words.reserve(py::len(vocab));
    for (const auto& item : vocab) {
      auto t = item.cast<py::tuple>();
      if (t.size() != 2) throw py::value_error("WordPiece: vocab items must be (token, id) pairs");
      std::string tok = t[0].cast<std::string>();
      int32_t id = t[1].cast<int32_t>();
      if (id < 0) throw py::value_error("WordPiece: vocab id " + std::to_string(id) + " of '" + tok + "' is < 0");
      max_len_ = std::max(max_len_, tok.size());
      // A continuation lookup asks for prefix + piece: keep those tokens, prefix stripped, in a table of
      // their own (the same answer, without building prefix + piece per lookup).
      if (!prefix.empty() && tok.size() > prefix.size() && tok.compare(0, prefix.size(), prefix) == 0)
        conts.emplace_back(tok.substr(prefix.size()), id);
      words.emplace_back(std::move(tok), id);
    }
    words_.build(words);
    conts_.build(conts);
    for (const auto& a : added) {
      std::string s = a.cast<std::string>();
      if (s.empty()) continue;
      for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      added_.push_back(std::move(s));
    }
  }

  // ids of each text, or None for a text outside this tokenizer's scope (see the file comment)
  py::list encode_many(const py::list& texts) const {
    const size_t n = py::len(texts);
    std::vector<const char*> ptrs(n, nullptr);
    std::vector<Py_ssize_t> lens(n, 0);
    for (size_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(texts.ptr(), static_cast<Py_ssize_t>(i));
      if (!PyUnicode_Check(o))
        throw py::type_error("WordPiece.encode_many: texts[" + std::to_string(i) + "] is " +
                             std::string(Py_TYPE(o)->tp_name) + ", not str");
      if (PyUnicode_IS_ASCII(o)) {  // compact ASCII: the UTF-8 form is the data itself, no copy
        ptrs[i] = PyUnicode_AsUTF8AndSize(o, &lens[i]);
        if (ptrs[i] == nullptr) throw py::error_already_set();
      }
    }
    std::vector<std::vector<int32_t>> out(n);
    std::vector<uint8_t> ok(n, 0);
    {
      py::gil_scoped_release nogil;  // the list keeps the strings (and their buffers) alive
#pragma omp parallel
      {
        std::string buf;
#pragma omp for schedule(dynamic, 256)
        for (int64_t i = 0; i < static_cast<int64_t>(n); ++i)
          if (ptrs[i] != nullptr) ok[i] = encode_one(ptrs[i], static_cast<size_t>(lens[i]), buf, out[i]);
      }
    }
    py::list res(n);
    for (size_t i = 0; i < n; ++i) {
      if (!ok[i]) {
        res[i] = py::none();
        continue;
      }
      const auto& v = out[i];
      PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(v.size()));
      if (t == nullptr) throw py::error_already_set();
      for (size_t k = 0; k < v.size(); ++k) PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(k), PyLong_FromLong(v[k]));
      res[i] = py::reinterpret_steal<py::object>(t);
    }
    return res;
  }

 private:
  // false when the text is outside scope; otherwise its ids in `ids`
  bool encode_one(const char* s, size_t n, std::string& buf, std::vector<int32_t>& ids) const {
    buf.assign(s, n);
    for (auto& ch : buf) {
      unsigned char c = static_cast<unsigned char>(ch);
      if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') return false;  // a control character
      if (c > 0x7E) return false;
      if (lowercase_ && c >= 'A' && c <= 'Z') ch = static_cast<char>(c + 32);
    }
    // An added token (e.g. "[SEP]") is split out before normalising: leave such texts to HF. Matched
    // case-insensitively (both sides lower-cased), which only ever sends more texts back, never fewer.
    if (!added_.empty()) {
      std::string low;
      const std::string* hay = &buf;
      if (!lowercase_) {
        low = buf;
        for (auto& ch : low) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        hay = &low;
      }
      for (const auto& a : added_)
        if (hay->find(a) != std::string::npos) return false;
    }
    size_t start = 0;
    for (size_t i = 0; i <= n; ++i) {
      unsigned char c = i < n ? static_cast<unsigned char>(buf[i]) : ' ';
      bool space = c == ' ' || c == '\t' || c == '\n' || c == '\r';
      bool punct = !space && is_ascii_punct(c);
      if (space || punct) {
        if (i > start) word(buf.data() + start, i - start, ids);
        if (punct) word(buf.data() + i, 1, ids);
        start = i + 1;
      }
    }
    return true;
  }

  // greedy longest-match-first, as Hugging Face's WordPiece: a word with any unmatched rest is one UNK
  void word(const char* w, size_t n, std::vector<int32_t>& ids) const {
    if (static_cast<int64_t>(n) > max_chars_) {  // ASCII: one byte per character
      ids.push_back(unk_id_);
      return;
    }
    const size_t mark = ids.size();
    size_t start = 0;
    while (start < n) {
      size_t end = std::min(n, start + max_len_);
      int32_t id = -1;
      const VocabTable& table = start == 0 ? words_ : conts_;
      for (; end > start; --end) {
        id = table.find(w + start, end - start);
        if (id >= 0) break;
      }
      if (id < 0) {
        ids.resize(mark);
        ids.push_back(unk_id_);
        return;
      }
      ids.push_back(id);
      start = end;
    }
  }

  VocabTable words_, conts_;
  std::vector<std::string> added_;
  int32_t unk_id_;
  int64_t max_chars_;
  bool lowercase_;
  size_t max_len_ = 0;
};

}  // namespace

void bind_wordpiece(py::module_& m) {
  py::class_<WordPiece>(m, "WordPiece",
                        "BERT WordPiece on printable-ASCII texts (see optimas_fast/reward/wordpiece.py)")
      .def(py::init<const py::list&, int32_t, const std::string&, int64_t, bool, const py::list&>(),
           py::arg("vocab"), py::arg("unk_id"), py::arg("prefix"), py::arg("max_chars"), py::arg("lowercase"),
           py::arg("added"))
      .def("encode_many", &WordPiece::encode_many, py::arg("texts"),
           "ids (a tuple) of each text, or None where the text is outside scope");
}

}  // namespace optimas

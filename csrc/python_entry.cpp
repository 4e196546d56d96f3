// bandadv._C: the Python module whose loading registers the kernels (group_advantages_cpu.cpp
// and, where built, the CUDA kernel), and the eager entry point of the public call.
//
// bandadv._C.group_advantages(rewards, group_size, offsets, success, valid, prior, options,
// return_index[, out]) calls the op torch.ops.bandadv.group_advantages (or its out= overload)
// through the dispatcher, as torch.ops does, but without torch.ops' Python argument handling:
// a call through torch.ops looks up each of the schema's 21 arguments by keyword, checks each
// for __torch_function__ and converts it, which costs more than the kernel on a 512 x 16 batch
// (callgrind: 21.5k instructions to build the argument stack). Here the options come as one
// tuple, AdvantageConfig's, converted once and kept (by the tuple's identity, holding it). The
// dispatcher still runs every dispatch key (autograd's fallback, dispatch modes, the profiler's
// record of the op); what this path leaves out, __torch_function__, it leaves to torch.ops: with
// a tensor subclass, a Tensor-like argument or a torch function mode it returns NotImplemented
// and the caller goes through torch.ops instead. It returns the public result, a GroupAdvantages,
// built here (set_result_types), or None with out=.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <string>
#include <vector>

#include "op_entry.h"

namespace bandadv {
namespace {

// The arguments the Python side passes, in this order (kArgNames'), but for the options, which
// come as one tuple in the schema's order (the arguments between the inputs and return_index).
constexpr int kInputs = kEstimator;  // rewards, group_size, offsets, success, valid, prior
constexpr int kPassed = kInputs + 2;  // ..., options, return_index
static_assert(kReturnIndex == kNumArgs - 1);
// Samples above which the GIL is released while the kernel runs (a call this large takes
// longer than releasing and taking back the GIL by a hundred times or more).
constexpr int64_t kReleaseGilSamples = 1 << 16;

struct Overload {
  c10::OperatorHandle op;
  size_t num_arguments;  // in the schema
};

// The op's overload, after checking that its schema's arguments are kArgNames in that order (the
// order this entry pushes them in; bandadv.ops.check_interface holds the options tuple, in
// OPTION_NAMES order, to the same schema), then for the out= form the outputs.
const Overload& overload(bool out_form) {
  auto find = [](const char* name) {
    const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("bandadv::group_advantages", name);
    const auto& arguments = op.schema().arguments();
    TORCH_CHECK(arguments.size() >= kArgNames.size(), "bandadv: the schema of ", op.schema().name(),
                " has too few arguments for this build; rebuild bandadv");
    for (size_t i = 0; i < kArgNames.size(); ++i) {
      TORCH_CHECK(arguments[i].name() == kArgNames[i], "bandadv: argument ", i, " of ", op.schema().name(), " is '",
                  arguments[i].name(), "', but this build passes '", std::string(kArgNames[i]),
                  "' there; rebuild bandadv");
    }
    return Overload{op, arguments.size()};
  };
  static const Overload functional = find("");
  static const Overload out = find("out");
  return out_form ? out : functional;
}

// An option's value (a Python object from AdvantageConfig) as the IValue of its schema type.
c10::IValue option_value(PyObject* value, const c10::Argument& argument) {
  const c10::TypePtr& type = argument.type();
  if (value == Py_None) {
    TORCH_CHECK_TYPE(type->kind() == c10::TypeKind::OptionalType, "bandadv: option ", argument.name(),
                     " cannot be None");
    return c10::IValue();
  }
  const c10::TypePtr base =
      type->kind() == c10::TypeKind::OptionalType ? type->castRaw<c10::OptionalType>()->getElementType() : type;
  switch (base->kind()) {
    case c10::TypeKind::BoolType:
      TORCH_CHECK_TYPE(PyBool_Check(value), "bandadv: option ", argument.name(), " must be a bool");
      return c10::IValue(value == Py_True);
    case c10::TypeKind::IntType: {
      TORCH_CHECK_TYPE(PyLong_Check(value) && !PyBool_Check(value), "bandadv: option ", argument.name(),
                       " must be an int");
      const long long x = PyLong_AsLongLong(value);
      if (x == -1 && PyErr_Occurred()) throw python_error();
      return c10::IValue(static_cast<int64_t>(x));
    }
    case c10::TypeKind::FloatType: {
      const double x = PyFloat_AsDouble(value);
      if (x == -1.0 && PyErr_Occurred()) throw python_error();
      return c10::IValue(x);
    }
    case c10::TypeKind::StringType: {
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(value, &size);
      if (data == nullptr) throw python_error();
      return c10::IValue(std::string(data, static_cast<size_t>(size)));
    }
    case c10::TypeKind::ListType: {
      TORCH_CHECK_TYPE(PyList_Check(value) || PyTuple_Check(value), "bandadv: option ", argument.name(),
                       " must be a list of floats");
      c10::List<double> list;
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(value);
      PyObject** items = PySequence_Fast_ITEMS(value);
      for (Py_ssize_t i = 0; i < n; ++i) {
        const double x = PyFloat_AsDouble(items[i]);
        if (x == -1.0 && PyErr_Occurred()) throw python_error();
        list.push_back(x);
      }
      return c10::IValue(std::move(list));
    }
    default:
      TORCH_CHECK_TYPE(false, "bandadv: option ", argument.name(), " has a schema type this entry does not read: ",
                       type->str());
  }
}

// The options of one AdvantageConfig as IValues, by the identity of its options tuple, which
// the cache holds (so that no other tuple can take its address). A trainer passes one config
// every step; a handful of entries covers any mix of them.
const std::vector<c10::IValue>& options_of(PyObject* options) {
  struct Entry {
    PyObject* key = nullptr;
    std::vector<c10::IValue> values;
  };
  static std::array<Entry, 8> cache;
  static size_t next = 0;
  for (const Entry& e : cache) {
    if (e.key == options) return e.values;
  }
  TORCH_CHECK_TYPE(PyTuple_Check(options), "bandadv: options must be a tuple (AdvantageConfig's)");
  const auto& arguments = overload(false).op.schema().arguments();
  const size_t n = arguments.size() - kInputs - 1;
  TORCH_CHECK_VALUE(static_cast<size_t>(PyTuple_GET_SIZE(options)) == n, "bandadv: the schema has ", n,
                    " options, got ", PyTuple_GET_SIZE(options));
  std::vector<c10::IValue> values;
  values.reserve(n);
  for (size_t i = 0; i < n; ++i) values.push_back(option_value(PyTuple_GET_ITEM(options, i), arguments[kInputs + i]));
  Entry& e = cache[next];
  next = (next + 1) % cache.size();
  Py_XDECREF(e.key);
  Py_INCREF(options);
  e.key = options;
  e.values = std::move(values);
  return e.values;
}

// A tensor argument, or None; false where torch.ops must take the call (__torch_function__).
bool tensor_argument(PyObject* obj, bool optional, c10::IValue& out) {
  if (optional && obj == Py_None) {
    out = c10::IValue();
    return true;
  }
  if (!THPVariable_CheckExact(obj)) return false;
  out = c10::IValue(THPVariable_Unpack(obj));
  return true;
}

// The types of the public result, bandadv.types.GroupAdvantages and GroupStats (named tuples),
// set once by bandadv.ops (set_result_types): the entry builds the result itself, as
// bandadv.advantages._result does from torch.ops' outputs, without the Python tuple between.
// The fields each must have, in this order, with the op's outputs (kOutputNames) that fill them.
constexpr std::array<std::string_view, 7> kResultFields = {
    "advantages", "sample_mask", "reason", "group_mask", "stats", "num_kept", "kept_index"};
constexpr std::array<std::string_view, 2> kStatsFields = {"count", "values"};
PyTypeObject* result_type = nullptr;
PyTypeObject* stats_type = nullptr;

// A named tuple type whose _fields are `fields`, or an error that says what differs.
template <size_t N>
PyTypeObject* named_tuple_type(PyObject* type, const std::array<std::string_view, N>& fields) {
  TORCH_CHECK_TYPE(PyType_Check(type) && PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(type), &PyTuple_Type),
                   "bandadv: set_result_types takes named tuple types");
  PyObject* names = PyObject_GetAttrString(type, "_fields");
  if (names == nullptr) throw python_error();
  std::string got;
  bool same = PyTuple_Check(names) && PyTuple_GET_SIZE(names) == static_cast<Py_ssize_t>(N);
  for (Py_ssize_t i = 0; PyTuple_Check(names) && i < PyTuple_GET_SIZE(names); ++i) {
    PyObject* item = PyTuple_GET_ITEM(names, i);
    const char* name = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : "?";
    if (name == nullptr) {
      Py_DECREF(names);
      throw python_error();
    }
    got += std::string(i ? ", " : "") + name;
    same = same && static_cast<size_t>(i) < N && fields[i] == name;
  }
  Py_DECREF(names);
  std::string expected;
  for (size_t i = 0; i < N; ++i) expected += std::string(i ? ", " : "") + std::string(fields[i]);
  TORCH_CHECK_TYPE(same, "bandadv: ", reinterpret_cast<PyTypeObject*>(type)->tp_name, " has fields (", got,
                   "), but this build fills (", expected, "); rebuild bandadv");
  Py_INCREF(type);
  return reinterpret_cast<PyTypeObject*>(type);
}

PyObject* set_result_types(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "bandadv._C.set_result_types takes (GroupAdvantages, GroupStats)");
  PyTypeObject* result = named_tuple_type(args[0], kResultFields);
  PyTypeObject* stats = nullptr;
  try {
    stats = named_tuple_type(args[1], kStatsFields);
  } catch (...) {
    Py_DECREF(result);
    throw;
  }
  Py_XDECREF(result_type);
  Py_XDECREF(stats_type);
  result_type = result;
  stats_type = stats;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// An instance of the named tuple type `type` holding `items` (references it takes over), made as
// tuple.__new__ makes one. Every item is set before any Python code can run.
template <size_t N>
PyObject* new_named_tuple(PyTypeObject* type, const std::array<PyObject*, N>& items) {
  PyObject* out = type->tp_alloc(type, static_cast<Py_ssize_t>(N));
  if (out == nullptr) {
    for (PyObject* item : items) Py_DECREF(item);
    return nullptr;
  }
  for (size_t i = 0; i < N; ++i) PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), items[i]);
  return out;
}

// The op's outputs (kOutputNames order) as a GroupAdvantages; kept_index is None unless
// return_index (the op then returns an empty tensor, which is dropped here unwrapped).
PyObject* build_result(torch::jit::Stack& outputs, bool return_index) {
  static_assert(kOutputNames.size() == 8 && kOutputNames[4] == "count" && kOutputNames[5] == "group_stats" &&
                kOutputNames[7] == "kept_index");
  std::array<PyObject*, kOutputNames.size()> t{};
  const size_t wrapped = return_index ? t.size() : t.size() - 1;
  for (size_t i = 0; i < wrapped; ++i) {
    t[i] = THPVariable_Wrap(std::move(outputs[i]).toTensor());
    if (t[i] == nullptr) {
      for (size_t j = 0; j < i; ++j) Py_DECREF(t[j]);
      return nullptr;
    }
  }
  if (!return_index) t[7] = Py_NewRef(Py_None);
  PyObject* stats = new_named_tuple<2>(stats_type, {t[4], t[5]});
  if (stats == nullptr) {
    for (size_t i : {0, 1, 2, 3, 6, 7}) Py_DECREF(t[i]);
    return nullptr;
  }
  return new_named_tuple<7>(result_type, {t[0], t[1], t[2], t[3], stats, t[6], t[7]});
}

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

PyObject* group_advantages(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kPassed || nargs == kPassed + 1, "bandadv._C.group_advantages takes ", kPassed,
                   " or ", kPassed + 1, " arguments, got ", nargs);
  TORCH_CHECK(result_type != nullptr, "bandadv._C.group_advantages: call set_result_types first (bandadv.ops does)");
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  const bool out_form = nargs == kPassed + 1 && args[kPassed] != Py_None;
  const Overload& target = overload(out_form);
  torch::jit::Stack stack;
  stack.reserve(target.num_arguments);
  c10::IValue value;
  if (!tensor_argument(args[0], false, value)) Py_RETURN_NOTIMPLEMENTED;
  const int64_t num_samples = value.toTensor().numel();
  stack.push_back(std::move(value));
  TORCH_CHECK_TYPE(PyLong_Check(args[1]) && !PyBool_Check(args[1]), "bandadv: group_size must be an int");
  const long long group_size = PyLong_AsLongLong(args[1]);
  if (group_size == -1 && PyErr_Occurred()) throw python_error();
  stack.emplace_back(static_cast<int64_t>(group_size));
  for (int i = 2; i < kInputs; ++i) {
    if (!tensor_argument(args[i], true, value)) Py_RETURN_NOTIMPLEMENTED;
    stack.push_back(std::move(value));
  }
  for (const c10::IValue& option : options_of(args[kInputs])) stack.push_back(option);
  const int return_index = PyObject_IsTrue(args[kInputs + 1]);
  if (return_index < 0) throw python_error();
  stack.emplace_back(return_index == 1);
  if (out_form) {
    PyObject* out = args[kPassed];
    TORCH_CHECK_TYPE(PyTuple_Check(out) && PyTuple_GET_SIZE(out) + stack.size() == target.num_arguments,
                     "bandadv: out must be a tuple of the op's ", target.num_arguments - stack.size(), " outputs");
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(out); ++i) {
      if (!tensor_argument(PyTuple_GET_ITEM(out, i), false, value)) Py_RETURN_NOTIMPLEMENTED;
      stack.push_back(std::move(value));
    }
  }
  TORCH_INTERNAL_ASSERT(stack.size() == target.num_arguments);
  if (num_samples > kReleaseGilSamples) {
    ReleaseGil released;
    target.op.callBoxed(stack);
  } else {
    target.op.callBoxed(stack);
  }
  if (out_form) Py_RETURN_NONE;
  TORCH_INTERNAL_ASSERT(stack.size() == kOutputNames.size());
  return build_result(stack, return_index);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"group_advantages", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&group_advantages)),
     METH_FASTCALL,
     "The op torch.ops.bandadv.group_advantages through the dispatcher, for eager calls: a GroupAdvantages, or None "
     "with out=."},
    {"set_result_types", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&set_result_types)),
     METH_FASTCALL, "The named tuple types group_advantages returns: (GroupAdvantages, GroupStats)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace bandadv

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, bandadv::methods};
  return PyModule_Create(&module_def);
}
}
